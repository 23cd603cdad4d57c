"""Summary metrics of a benchmark run, under the names `vllm bench serve` writes.

`summarize` turns the client's `RequestRecord`s into one flat dict. Its keys and their
definitions follow vLLM 0.32's `vllm/benchmarks/serve.py` (`calculate_metrics` and the
result dict), so a ShuffleInfer run and a `vllm bench serve` run can be compared key by key:

- only completed requests (`ok`) count in latencies, token totals and throughputs;
- TPOT of a request is `(e2e - ttft) / (output_tokens - 1)`, over requests with at least
  two output tokens; ITL is every gap between consecutive streamed chunks, pooled over
  requests (a chunk that carries several tokens is one gap, as in vLLM);
- `request_goodput` counts completed requests whose every given SLO holds (`<=`), where a
  request with fewer than two output tokens has a TPOT of 0, per second of `duration`;
- statistics are in milliseconds: `mean_*`, `median_*`, `std_*` (population) and one
  `p{p}_*` per asked percentile (numpy's linear interpolation).

On top of vLLM's keys: `*_jct_ms` (job completion time, from the trace's arrival to the
last byte, so client-side lag counts), `slo_attainment`, `instance_seconds` and the
per-instance-second throughputs (the paper's performance per dollar).

Nothing is NaN. A statistic over no values is 0.0, as in vLLM (`np.mean(values or 0)`);
`request_goodput` and `slo_attainment` are None when no SLO is given, as vLLM writes
`request_goodput: null` without a goodput config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from benchmarks.records import RequestRecord

Summary = dict[str, float | int | None]
"""One run's summary: metric name to value (None only where documented)."""

DEFAULT_TABLE_KEYS: list[str] = [
    "completed",
    "failed",
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "slo_attainment",
    "mean_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "mean_e2el_ms",
    "mean_jct_ms",
    "p99_jct_ms",
    "output_throughput_per_instance_s",
]
"""Keys a side-by-side comparison shows when the caller names none."""


def summarize(
    records: list[RequestRecord],
    *,
    duration_s: float,
    num_instances: int,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
    percentiles: tuple[float, ...] = (50, 90, 99),
) -> Summary:
    """Summarise one run under `vllm bench serve`'s result keys plus JCT, SLO and cost.

    `duration_s` is the run's wall time (vLLM's `duration`), `num_instances` the number
    of serving instances it occupied (for `instance_seconds`). SLOs are in milliseconds;
    a request meets them when its TTFT and TPOT are at most the given bounds.
    """
    _check_args(duration_s, num_instances, ttft_slo_ms, tpot_slo_ms, percentiles)
    completed = [r for r in records if r.ok]
    total_input = sum(r.prompt_tokens for r in completed)
    total_output = sum(r.output_tokens for r in completed)
    max_tokens_per_s, max_concurrent = _peaks(completed)

    summary: Summary = {
        "duration": float(duration_s),
        "completed": len(completed),
        "failed": len(records) - len(completed),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(completed) / duration_s,
        "request_goodput": None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": max_tokens_per_s,
        "max_concurrent_requests": max_concurrent,
    }
    samples: dict[str, list[float]] = {
        "ttft": _present(r.ttft_s for r in completed),
        "tpot": _present(r.tpot_s for r in completed),
        "itl": [gap for r in completed for gap in r.itl_s],
        "e2el": _present(r.e2e_s for r in completed),
        "jct": _present(r.jct_s for r in completed),
    }
    for name, values_s in samples.items():
        summary.update(_stats_ms(name, values_s, percentiles))

    slo_attainment: float | None = None
    if ttft_slo_ms is not None or tpot_slo_ms is not None:
        num_good = sum(_meets_slos(r, ttft_slo_ms, tpot_slo_ms) for r in completed)
        summary["request_goodput"] = num_good / duration_s
        # Failed requests are misses: the fraction is over every request sent.
        slo_attainment = num_good / len(records) if records else 0.0
    summary["slo_attainment"] = slo_attainment

    instance_seconds = num_instances * duration_s
    summary["instance_seconds"] = float(instance_seconds)
    summary["request_throughput_per_instance_s"] = len(completed) / instance_seconds
    summary["output_throughput_per_instance_s"] = total_output / instance_seconds
    return summary


def token_arrivals(record: RequestRecord) -> list[tuple[float, float]]:
    """(time, tokens) for every streamed chunk of a request.

    The request's `output_tokens` are spread evenly over its chunks, so a chunk that
    bundles several tokens weighs more; with one token per chunk (vLLM's default
    streaming) every chunk counts 1, exactly as `vllm bench serve` counts. A request
    with tokens but no chunk times (not streamed) puts them all at `finished_at_s`.
    """
    times = record.token_times_s
    if times:
        per_chunk = record.output_tokens / len(times) if record.output_tokens > 0 else 1.0
        return [(t, per_chunk) for t in times]
    if record.output_tokens > 0 and record.finished_at_s is not None:
        return [(record.finished_at_s, float(record.output_tokens))]
    return []


def format_table(summaries: Mapping[str, Mapping[str, object]], keys: Sequence[str]) -> str:
    """A plain-text table: one row per key, one column per system."""
    _check_keys(summaries, keys)
    header = ["metric", *summaries]
    rows = [[key, *(_fmt(s.get(key)) for s in summaries.values())] for key in keys]
    return _render(header, rows)


def ratio_table(
    summaries: Mapping[str, Mapping[str, object]],
    reference: str,
    keys: Sequence[str] | None = None,
) -> str:
    """Like `format_table`, plus a `system/reference` ratio column per other system.

    A ratio is shown as `-` where either value is missing or the reference is 0.
    """
    if reference not in summaries:
        raise ValueError(
            f"reference system {reference!r} is not among the summaries; "
            f"known: {', '.join(summaries) or '(none)'}"
        )
    keys = DEFAULT_TABLE_KEYS if keys is None else keys
    _check_keys(summaries, keys)
    others = [name for name in summaries if name != reference]
    header = ["metric", reference, *others, *(f"{o}/{reference}" for o in others)]
    rows = []
    for key in keys:
        ref_value = summaries[reference].get(key)
        values = [summaries[o].get(key) for o in others]
        rows.append(
            [key, _fmt(ref_value), *map(_fmt, values), *(_ratio(v, ref_value) for v in values)]
        )
    return _render(header, rows)


def _check_args(
    duration_s: float,
    num_instances: int,
    ttft_slo_ms: float | None,
    tpot_slo_ms: float | None,
    percentiles: tuple[float, ...],
) -> None:
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s!r}")
    if isinstance(num_instances, bool) or not isinstance(num_instances, int) or num_instances < 1:
        raise ValueError(f"num_instances must be an integer >= 1, got {num_instances!r}")
    for name, slo in (("ttft_slo_ms", ttft_slo_ms), ("tpot_slo_ms", tpot_slo_ms)):
        if slo is not None and not (math.isfinite(slo) and slo > 0):
            raise ValueError(f"{name} must be a positive number of milliseconds, got {slo!r}")
    for p in percentiles:
        if not (0 <= p <= 100):
            raise ValueError(f"percentiles must lie in [0, 100], got {p!r} in {percentiles!r}")


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _percentile_key(p: float, name: str) -> str:
    # vLLM's spelling: p99, p99.9
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{name}_ms"


def _stats_ms(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> Summary:
    """mean/median/std/percentiles of `values_s`, in ms; 0.0 for no values (as vLLM)."""
    data = np.asarray(values_s or [0.0], dtype=float) * 1000.0
    stats: Summary = {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
    }
    for p in percentiles:
        stats[_percentile_key(p, name)] = float(np.percentile(data, p))
    return stats


def _meets_slos(
    record: RequestRecord, ttft_slo_ms: float | None, tpot_slo_ms: float | None
) -> bool:
    """Whether a completed request meets every given SLO (vLLM's goodput rule)."""
    if ttft_slo_ms is not None:
        ttft = record.ttft_s
        if ttft is None or ttft > ttft_slo_ms / 1000.0:
            return False
    if tpot_slo_ms is not None:
        tpot = record.tpot_s
        # vLLM: a request with fewer than two output tokens has TPOT 0 for goodput.
        if (tpot if tpot is not None else 0.0) > tpot_slo_ms / 1000.0:
            return False
    return True


def _peaks(completed: list[RequestRecord]) -> tuple[float, int]:
    """vLLM's `max_output_tokens_per_s` and `max_concurrent_requests`, in 1-s buckets
    counted from the first completed request's sending."""
    spans = [
        (r, r.sent_at_s, r.finished_at_s)
        for r in completed
        if r.sent_at_s is not None and r.finished_at_s is not None
    ]
    if not spans:
        return 0.0, 0
    start = min(sent for _, sent, _ in spans)
    end = max(finished for _, _, finished in spans)
    num_buckets = int(math.ceil(end - start)) + 1
    tokens = np.zeros(num_buckets)
    concurrent = np.zeros(num_buckets, dtype=int)
    for r, sent, finished in spans:
        for t, n in token_arrivals(r):
            bucket = int(t - start)
            if 0 <= bucket < num_buckets:
                tokens[bucket] += n
        concurrent[int(sent - start) : int(finished - start) + 1] += 1
    return float(tokens.max()), int(concurrent.max())


def _check_keys(summaries: Mapping[str, Mapping[str, object]], keys: Sequence[str]) -> None:
    if not summaries:
        raise ValueError("no summaries to tabulate: give at least one system")
    unknown = [k for k in keys if all(k not in s for s in summaries.values())]
    if unknown:
        raise ValueError(f"keys not in any summary: {', '.join(unknown)}")


def _fmt(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _ratio(value: object, reference: object) -> str:
    numbers = (int, float)
    if not isinstance(value, numbers) or not isinstance(reference, numbers) or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
