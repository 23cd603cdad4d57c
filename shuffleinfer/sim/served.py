"""A cost model fitted on the steps served engines ran, read off their logs.

`shuffleinfer calibrate --profile` times steps on an engine alone on an idle core. A
served engine shares this machine's cores with its peers, the API process, Ray and the
load generator, and each of its steps is slower for it. With vLLM's
`enable_logging_iteration_details` (`python -m benchmarks compare --log-steps` turns it on
for every engine) each engine logs every step it ran:

    Iteration(12): 1 context requests, 256 context tokens, 3 generation requests,
    3 generation tokens, iteration elapsed time: 612.30 ms, CPU KV cache usage: 2.1%

`read_steps` turns those lines into `StepSample`s per engine (a ShuffleInfer engine is
named by Ray's line prefix, `(EngineInstance(decode-0, decode) pid=...)`; a `vllm serve`
log holds one engine); `fit_served` fits `LinearCost` on them. What a line does not say
is estimated: a step's attention work as if its prompt slices were equal and started at
their prompts' beginnings (`T**2 / requests`), its decodes' context as its KV usage times
the cache's size. A context request of one token is a decode whose KV came from a prefill
instance (its first step on the decode instance), and counted as one.

A logged step's time is the model's run only. What serving adds around it, per step
(scheduling, handing outputs on) and per request (HTTP, routing), `fit_overheads` fits
on a real run's mean TTFT and JCT; `python -m benchmarks.sim_fidelity` fits both on one
run and checks them on another.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from benchmarks.records import TraceRequest
from shuffleinfer.sim.cost import FitReport, LinearCost, StepSample, fit_steps
from shuffleinfer.sim.simulator import SimConfig, Simulator

_ITERATION = re.compile(
    r"Iteration\(\d+\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
    r"requests, \d+ generation tokens, iteration elapsed time: ([\d.]+) ms( \(dummy\))?, "
    r"\S+ KV cache usage: ([\d.]+)%")
_RAY_ACTOR = re.compile(r"\(EngineInstance\(([^,)]+)")

WARMUP_STEPS = 2
"""Steps each engine runs first and that are left out (they include one-time work)."""


def read_steps(lines: Iterable[str], kv_capacity_tokens: int,
               default_engine: str) -> dict[str, list[StepSample]]:
    """Every logged step, by engine, in order (dummy steps left out)."""
    steps: dict[str, list[StepSample]] = {}
    for line in lines:
        m = _ITERATION.search(line)
        if m is None or m.group(5):
            continue
        actor = _RAY_ACTOR.search(line)
        engine = actor.group(1) if actor else default_engine
        requests, tokens, batch = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if requests and tokens == requests:  # first steps of handed-over decodes
            batch, requests, tokens = batch + requests, 0, 0
        context = round(float(m.group(6)) / 100 * kv_capacity_tokens) if batch else 0
        attn = tokens * tokens / requests if requests else 0.0
        steps.setdefault(engine, []).append(
            StepSample(tokens, attn, batch, context, float(m.group(4)) / 1000))
    return steps


def read_run_steps(log_paths: Iterable[Path], kv_capacity_tokens: int) -> list[StepSample]:
    """The steps of every engine in these logs, each engine's warm-up steps left out."""
    out: list[StepSample] = []
    for path in log_paths:
        with open(path, errors="replace") as f:
            by_engine = read_steps(f, kv_capacity_tokens, default_engine=path.stem)
        for steps in by_engine.values():
            out.extend(steps[WARMUP_STEPS:])
    return out


def fit_served(name: str, steps: list[StepSample], *, kv_bytes_per_token: float,
               link_bytes_per_s: float, source: str) -> tuple[LinearCost, FitReport]:
    """`fit_steps` on served steps, refitted once without the steps it misses by more than
    3x (a step that waited on something else: a peer's burst, a garbage collection)."""
    model, _ = fit_steps(name, steps, kv_bytes_per_token=kv_bytes_per_token,
                         link_bytes_per_s=link_bytes_per_s, source=source)
    kept = [s for s in steps
            if s.seconds <= 3 * model.step_s(s.tokens, s.attn, s.batch, s.context)]
    return fit_steps(name, kept, kv_bytes_per_token=kv_bytes_per_token,
                     link_bytes_per_s=link_bytes_per_s, source=source)


STEP_OVERHEADS_S = tuple(i * 0.002 for i in range(41))
REQUEST_OVERHEADS_S = tuple(i * 0.01 for i in range(51))


def with_step_overhead(model: LinearCost, seconds: float) -> LinearCost:
    """`model` with `seconds` more per step (both kinds)."""
    return replace(model, prefill_base_s=model.prefill_base_s + seconds,
                   decode_base_s=model.decode_base_s + seconds)


def fit_overheads(model: LinearCost, config: SimConfig, requests: Sequence[TraceRequest],
                  real_mean_ttft_s: float, real_mean_jct_s: float) -> tuple[LinearCost, float]:
    """What a logged step's time leaves out, fitted on a real run of `requests`: the time
    an engine spends per step outside the model (scheduling, handing outputs on: added to
    both step bases) and per request in front of the engines (HTTP, routing: the
    simulator's `request_overhead_s`). The pair whose simulation of `requests` comes
    closest to the real mean TTFT and JCT (summed squared relative errors), over a grid of
    0-80 ms per step and 0-500 ms per request."""
    best: tuple[float, LinearCost, float] | None = None
    for step_s in STEP_OVERHEADS_S:
        stepped = with_step_overhead(model, step_s)
        for request_s in REQUEST_OVERHEADS_S:
            result = Simulator(replace(config, request_overhead_s=request_s), stepped).run(
                requests)
            ttft = statistics.mean(r.ttft_s or 0.0 for r in result.records)
            jct = statistics.mean(r.jct_s or 0.0 for r in result.records)
            miss = ((ttft - real_mean_ttft_s) / real_mean_ttft_s) ** 2 \
                + ((jct - real_mean_jct_s) / real_mean_jct_s) ** 2
            if best is None or miss < best[0]:
                best = (miss, stepped, request_s)
    assert best is not None  # the grids are not empty
    return best[1], best[2]
