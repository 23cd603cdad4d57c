"""Summary metrics against a hand-worked run of four requests, and the comparison tables."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks.metrics import format_table, ratio_table, summarize
from benchmarks.records import RequestRecord


def _record(
    index: int,
    *,
    scheduled: float,
    sent: float,
    prompt: int,
    tokens: list[float],
    output_tokens: int | None = None,
    finished: float | None = None,
    ok: bool = True,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        endpoint="http://test",
        scheduled_at_s=scheduled,
        prompt_tokens=prompt,
        max_tokens=16,
        sent_at_s=sent,
        first_token_at_s=tokens[0] if tokens else None,
        finished_at_s=finished if finished is not None else (tokens[-1] if tokens else None),
        output_tokens=len(tokens) if output_tokens is None else output_tokens,
        token_times_s=tokens,
        ok=ok,
        error=None if ok else "HTTP 500",
    )


# A: sent on time; TTFT 0.5 s, 5 tokens 0.2 s apart: TPOT 0.2 s, E2E 1.3 s, JCT 1.3 s.
# B: arrives at 1.0 but the client sends it at 1.5; TTFT 1.0 s, 3 tokens 0.5 s apart:
#    TPOT 0.5 s, E2E 2.0 s, JCT 2.5 s (the client lag counts in JCT only).
# C: a single token: TTFT = E2E = JCT = 0.2 s, no TPOT, no ITL.
# D: failed after 0.1 s without a token.
A = _record(0, scheduled=0.0, sent=0.0, prompt=100, tokens=[0.5, 0.7, 0.9, 1.1, 1.3])
B = _record(1, scheduled=1.0, sent=1.5, prompt=200, tokens=[2.5, 3.0, 3.5])
C = _record(2, scheduled=2.0, sent=2.0, prompt=50, tokens=[2.2])
D = _record(3, scheduled=3.0, sent=3.0, prompt=80, tokens=[], finished=3.1, ok=False)
RUN = [A, B, C, D]


def _linear_percentile(values: list[float], p: float) -> float:
    """Percentile by linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def test_counts_and_throughputs_count_only_completed_requests() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=2)
    assert s["duration"] == 4.0
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 350  # D's 80 prompt tokens do not count
    assert s["total_output_tokens"] == 9
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(9 / 4)
    assert s["total_token_throughput"] == pytest.approx(359 / 4)
    assert s["instance_seconds"] == 8.0
    assert s["request_throughput_per_instance_s"] == pytest.approx(3 / 8)
    assert s["output_throughput_per_instance_s"] == pytest.approx(9 / 8)


@pytest.mark.parametrize(
    ("name", "values_ms"),
    [
        ("ttft", [500.0, 1000.0, 200.0]),
        ("tpot", [200.0, 500.0]),  # C has one token: no TPOT
        ("itl", [200.0] * 4 + [500.0] * 2),  # every gap, pooled over requests
        ("e2el", [1300.0, 2000.0, 200.0]),
        ("jct", [1300.0, 2500.0, 200.0]),
    ],
)
def test_latency_statistics_match_hand_computed_values(name: str, values_ms: list[float]) -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1, percentiles=(50, 90, 99))
    assert s[f"mean_{name}_ms"] == pytest.approx(statistics.fmean(values_ms))
    assert s[f"median_{name}_ms"] == pytest.approx(statistics.median(values_ms))
    assert s[f"std_{name}_ms"] == pytest.approx(statistics.pstdev(values_ms))
    for p in (50, 90, 99):
        assert s[f"p{p}_{name}_ms"] == pytest.approx(_linear_percentile(values_ms, p))


def test_p99_values_worked_by_hand() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1)
    # sorted TTFT 200, 500, 1000: rank 0.99 * 2 = 1.98 -> 500 + 0.98 * 500
    assert s["p99_ttft_ms"] == pytest.approx(990.0)
    assert s["p99_tpot_ms"] == pytest.approx(497.0)
    assert s["p99_jct_ms"] == pytest.approx(2476.0)
    assert s["median_itl_ms"] == pytest.approx(200.0)


def test_peak_output_rate_and_concurrency_in_one_second_buckets() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1)
    assert s["max_output_tokens_per_s"] == 3.0  # A's tokens at 0.5, 0.7, 0.9
    assert s["max_concurrent_requests"] == 2  # A and B in second 1, B and C in second 2


def test_goodput_counts_completed_requests_meeting_both_slos() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1, ttft_slo_ms=600, tpot_slo_ms=300)
    # A meets both; B misses TTFT; C meets both (one token: TPOT counts as 0); D failed.
    assert s["request_goodput"] == pytest.approx(2 / 4.0)
    assert s["slo_attainment"] == pytest.approx(2 / 4)


def test_slo_bound_is_inclusive_and_failed_requests_are_misses() -> None:
    s = summarize(RUN, duration_s=2.0, num_instances=1, ttft_slo_ms=1000)
    # A, B (exactly 1000 ms) and C meet it; D cannot.
    assert s["request_goodput"] == pytest.approx(3 / 2.0)
    assert s["slo_attainment"] == pytest.approx(3 / 4)


def test_tpot_slo_alone() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1, tpot_slo_ms=250)
    assert s["slo_attainment"] == pytest.approx(2 / 4)  # B's 500 ms TPOT misses


def test_without_slos_goodput_and_attainment_are_none() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1)
    assert s["request_goodput"] is None
    assert s["slo_attainment"] is None


def test_bundled_chunks_count_every_token_but_one_gap_per_chunk() -> None:
    # 6 tokens in 3 chunks: TPOT uses tokens, ITL uses chunk gaps (as vLLM does).
    r = _record(0, scheduled=0.0, sent=0.0, prompt=10, tokens=[0.2, 0.4, 0.6], output_tokens=6)
    s = summarize([r], duration_s=1.0, num_instances=1)
    assert s["mean_tpot_ms"] == pytest.approx((600 - 200) / 5)
    assert s["mean_itl_ms"] == pytest.approx(200.0)
    assert s["max_output_tokens_per_s"] == pytest.approx(6.0)


def _assert_no_nan(summary: dict[str, float | int | None]) -> None:
    for key, value in summary.items():
        assert value is None or math.isfinite(value), key


def test_empty_input_gives_zeros_not_nan() -> None:
    s = summarize([], duration_s=10.0, num_instances=2, ttft_slo_ms=100, tpot_slo_ms=50)
    _assert_no_nan(s)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (0, 0, 0)
    assert s["mean_ttft_ms"] == 0.0 and s["p99_jct_ms"] == 0.0
    assert s["request_goodput"] == 0.0 and s["slo_attainment"] == 0.0
    assert s["max_concurrent_requests"] == 0


def test_all_failed_gives_zero_throughput_and_attainment() -> None:
    s = summarize([D, D], duration_s=5.0, num_instances=1, ttft_slo_ms=100)
    _assert_no_nan(s)
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["request_throughput"] == 0.0 and s["output_throughput"] == 0.0
    assert s["slo_attainment"] == 0.0 and s["mean_e2el_ms"] == 0.0


def test_fractional_percentile_uses_vllm_key_spelling() -> None:
    s = summarize(RUN, duration_s=4.0, num_instances=1, percentiles=(99.9,))
    assert "p99.9_ttft_ms" in s and "p99_ttft_ms" not in s


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"duration_s": 0.0, "num_instances": 1}, "duration_s"),
        ({"duration_s": float("nan"), "num_instances": 1}, "duration_s"),
        ({"duration_s": 1.0, "num_instances": 0}, "num_instances"),
        ({"duration_s": 1.0, "num_instances": 1, "ttft_slo_ms": -5}, "ttft_slo_ms"),
        ({"duration_s": 1.0, "num_instances": 1, "percentiles": (150,)}, "percentiles"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        summarize(RUN, **kwargs)


SUMMARIES = {
    "vllm": {"mean_ttft_ms": 200.0, "completed": 10, "request_goodput": None},
    "shuffleinfer": {"mean_ttft_ms": 100.0, "completed": 12, "request_goodput": 0.5},
}


def _row(table: str, key: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.startswith(key))


def test_format_table_puts_systems_side_by_side() -> None:
    table = format_table(SUMMARIES, ["mean_ttft_ms", "completed", "request_goodput"])
    assert table.splitlines()[0].split() == ["metric", "vllm", "shuffleinfer"]
    assert _row(table, "completed") == ["completed", "10", "12"]
    assert _row(table, "request_goodput") == ["request_goodput", "-", "0.5"]


def test_ratio_table_divides_by_the_reference() -> None:
    table = ratio_table(SUMMARIES, "vllm", ["mean_ttft_ms", "completed", "request_goodput"])
    assert table.splitlines()[0].split()[-1] == "shuffleinfer/vllm"
    assert _row(table, "mean_ttft_ms") == ["mean_ttft_ms", "200.0", "100.0", "0.50x"]
    assert _row(table, "completed") == ["completed", "10", "12", "1.20x"]
    assert _row(table, "request_goodput")[-1] == "-"  # no reference value: no ratio


def test_table_errors_name_the_bad_input() -> None:
    with pytest.raises(ValueError, match="'sglang'.*vllm, shuffleinfer"):
        ratio_table(SUMMARIES, "sglang", ["completed"])
    with pytest.raises(ValueError, match="mean_ttf_ms"):
        format_table(SUMMARIES, ["mean_ttf_ms"])
