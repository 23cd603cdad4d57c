"""When each request of a trace is sent, and which requests a run keeps.

Two ways to get arrival times:

- from the trace's own timestamps, sped up by `time_scale` (2 replays twice as fast);
- from a request `rate`: gaps between requests are Gamma-distributed with mean
  ``1 / rate`` and shape `burstiness`, exactly as `vllm bench serve --burstiness` draws
  them (1.0 is a Poisson process; below 1 burstier, above 1 more regular). The first
  request is sent at 0 and the trace's order is kept.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from benchmarks.records import Trace, TraceRequest


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")


def arrival_times(
    trace: Trace,
    *,
    time_scale: float = 1.0,
    rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Send time in seconds (from the start of the run) of every request of `trace`, in
    the trace's order. The same `seed` gives the same times.

    Raises `ValueError` for a non-positive `rate`, `burstiness` or `time_scale`, for a
    `time_scale` together with a `rate` (change the rate instead), and for an untimed
    trace without a `rate`.
    """
    num = len(trace.requests)
    if rate is not None:
        _check_positive("rate", rate)
        _check_positive("burstiness", burstiness)
        if time_scale != 1.0:
            raise ValueError(
                "time_scale speeds up a trace's own timestamps and does not combine with "
                "a rate; change the rate instead")
        theta = 1.0 / (rate * burstiness)
        gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=theta,
                                                 size=max(num - 1, 0))
        return [0.0, *np.cumsum(gaps).tolist()][:num]
    if not trace.timed:
        raise ValueError(
            f"trace {trace.name!r} has no timestamps: pass --rate (requests per second) "
            "to generate arrivals")
    _check_positive("time_scale", time_scale)
    return [r.arrival_s / time_scale for r in trace.requests]


def select(
    trace: Trace,
    arrivals: list[float],
    *,
    max_requests: int | None = None,
    duration_s: float | None = None,
) -> Trace:
    """The first requests of `trace` that fit both limits, with `arrivals` as their
    arrival times: at most `max_requests` of them, all arriving before `duration_s`
    (None: no limit). The result is timed.

    Raises `ValueError` when `arrivals` does not match the trace's length or a limit is not
    positive.
    """
    if len(arrivals) != len(trace.requests):
        raise ValueError(f"{len(arrivals)} arrival times for the {len(trace.requests)} "
                         f"requests of trace {trace.name!r}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be at least 1, got {max_requests}")
    if duration_s is not None:
        _check_positive("duration_s", duration_s)
    kept: list[TraceRequest] = []
    for request, arrival_s in zip(trace.requests, arrivals, strict=True):
        if max_requests is not None and len(kept) >= max_requests:
            break
        if duration_s is not None and arrival_s >= duration_s:
            break
        kept.append(replace(request, arrival_s=arrival_s))
    return replace(trace, requests=kept, timed=True)
