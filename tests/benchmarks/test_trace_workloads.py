"""Workloads built on the readers: the paper's classes (thresholds, seeded sampling,
context scaling), scaling of timed traces, arrival times from a rate or the trace's own
timestamps, and the selection of the requests a run keeps."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

import pytest

from benchmarks.records import Trace, TraceRequest
from benchmarks.traces import (
    DEFAULT_DATA_DIR,
    WorkloadClass,
    arrival_times,
    class_of,
    fit_to_context,
    load_trace,
    read_mooncake,
    read_sharegpt_lengths,
    select,
    workload_class,
)
from benchmarks.traces.spec import SHAREGPT_LENGTHS_FILE, SHIPPED

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(),
                                reason=f"shared data not found at {DEFAULT_DATA_DIR}")

RULES = {
    "lpld": lambda p, o: p <= 512 and o <= 128,
    "lphd": lambda p, o: p <= 512 and o > 128,
    "hpld": lambda p, o: p > 512 and o <= 128,
    "hphd": lambda p, o: p > 512 and o > 128,
}


@pytest.fixture(scope="module")
def sharegpt() -> Trace:
    if not DEFAULT_DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DEFAULT_DATA_DIR}")
    return read_sharegpt_lengths(DEFAULT_DATA_DIR / SHAREGPT_LENGTHS_FILE)


def untimed(*lengths: tuple[int, int]) -> Trace:
    return Trace("t", [TraceRequest(0.0, p, o) for p, o in lengths], timed=False)


# --- classes -------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "output", "expected"), [
    (512, 128, WorkloadClass.LPLD), (512, 129, WorkloadClass.LPHD),
    (513, 128, WorkloadClass.HPLD), (513, 129, WorkloadClass.HPHD),
    (1, 1, WorkloadClass.LPLD),
])
def test_thresholds_are_more_than_512_and_more_than_128(
        prompt: int, output: int, expected: WorkloadClass) -> None:
    assert class_of(prompt, output) is expected


@pytest.mark.parametrize("name", list(RULES))
def test_every_class_member_meets_its_thresholds(sharegpt: Trace, name: str) -> None:
    trace = workload_class(sharegpt, WorkloadClass(name))
    assert trace.requests and not trace.timed
    assert all(RULES[name](r.prompt_tokens, r.output_tokens) for r in trace.requests)
    assert {r.task for r in trace.requests} == {name.upper()}


def test_classes_partition_sharegpt_and_mixed_is_all_of_it(sharegpt: Trace) -> None:
    sizes = {n: len(workload_class(sharegpt, WorkloadClass(n)).requests) for n in RULES}
    mixed = workload_class(sharegpt, WorkloadClass.MIXED)
    assert sizes == {"lpld": 1561, "lphd": 5599, "hpld": 2992, "hphd": 20579}
    assert len(mixed.requests) == sum(sizes.values()) == 30731
    assert Counter(r.task for r in mixed.requests) == {n.upper(): c for n, c in sizes.items()}


def test_class_sampling_is_seeded(sharegpt: Trace) -> None:
    def draw(seed: int) -> list[tuple[int, int]]:
        trace = workload_class(sharegpt, WorkloadClass.LPHD, num_requests=50, seed=seed)
        return [(r.prompt_tokens, r.output_tokens) for r in trace.requests]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert len(set(draw(7))) > 40  # a sample, not 50 copies of one request


@needs_data
def test_class_specs_are_case_insensitive_and_seeded(sharegpt: Trace) -> None:
    by_spec = load_trace("LpHd", data_dir=DEFAULT_DATA_DIR, num_requests=20, seed=5)
    direct = workload_class(sharegpt, WorkloadClass.LPHD, num_requests=20, seed=5)
    assert by_spec.requests == direct.requests
    assert by_spec.name == "lphd" and not by_spec.timed


def test_class_lengths_scale_to_the_context_after_membership(sharegpt: Trace) -> None:
    original = workload_class(sharegpt, WorkloadClass.HPHD, num_requests=200, seed=1)
    scaled = workload_class(sharegpt, WorkloadClass.HPHD, num_requests=200, seed=1,
                            max_model_len=1024)
    longest = max(r.prompt_tokens + r.output_tokens for r in original.requests)
    assert scaled.length_scale == pytest.approx(1024 / longest)
    assert max(r.prompt_tokens + r.output_tokens for r in scaled.requests) <= 1024
    for before, after in zip(original.requests, scaled.requests, strict=True):
        assert after.prompt_tokens == max(1, math.floor(before.prompt_tokens
                                                        * scaled.length_scale))
        assert after.output_tokens == max(1, math.floor(before.output_tokens
                                                        * scaled.length_scale))
        assert after.task == "HPHD"  # still heavy by its original lengths
    assert any(r.prompt_tokens <= 512 for r in scaled.requests)


def test_no_scaling_when_everything_fits() -> None:
    lengths = untimed((600, 200), (10, 10), (100, 5))
    trace = workload_class(lengths, WorkloadClass.MIXED, max_model_len=800)
    assert trace.length_scale == 1.0
    assert sorted((r.prompt_tokens, r.output_tokens) for r in trace.requests) \
        == [(10, 10), (100, 5), (600, 200)]


def test_scaled_lengths_never_drop_below_one_token() -> None:
    trace = workload_class(untimed((4000, 3), (2, 4000)), WorkloadClass.MIXED,
                           max_model_len=100)
    assert trace.length_scale == pytest.approx(100 / 4003)
    assert sorted((r.prompt_tokens, r.output_tokens) for r in trace.requests) \
        == [(1, 99), (99, 1)]


def test_asking_for_more_requests_than_a_class_has_is_an_error() -> None:
    with pytest.raises(ValueError, match="HPHD has 1 requests"):
        workload_class(untimed((600, 200), (10, 10)), WorkloadClass.HPHD, num_requests=2)


# --- context scaling of timed traces -------------------------------------------------

@needs_data
def test_timed_traces_scale_lengths_and_keep_arrivals() -> None:
    original = read_mooncake(DEFAULT_DATA_DIR / SHIPPED["mooncake"][0])
    scaled = fit_to_context(original, 8192)
    assert scaled.length_scale == pytest.approx(8192 / 126527)  # longest: 126527 tokens
    assert max(r.prompt_tokens + r.output_tokens for r in scaled.requests) <= 8192
    assert [r.arrival_s for r in scaled.requests] == [r.arrival_s for r in original.requests]
    first = scaled.requests[0]
    # The prefix blocks shrink with the prompt, so the 14 blocks still cover it.
    assert first.block_tokens == math.floor(512 * scaled.length_scale)
    assert first.prompt_tokens <= 14 * first.block_tokens


@needs_data
def test_num_requests_keeps_the_first_of_a_timed_trace() -> None:
    trace = load_trace("azure2023-code", data_dir=DEFAULT_DATA_DIR, num_requests=3)
    assert [r.prompt_tokens for r in trace.requests] == [4808, 3180, 110]


# --- arrivals ------------------------------------------------------------------------

MANY = untimed(*[(10, 10)] * 20_001)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_rate_arrivals_are_seeded() -> None:
    trace = untimed(*[(10, 10)] * 100)
    first = arrival_times(trace, rate=2.0, seed=3)
    assert first == arrival_times(trace, rate=2.0, seed=3)
    assert first != arrival_times(trace, rate=2.0, seed=4)
    assert first[0] == 0.0 and first == sorted(first) and len(first) == 100


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_gamma_gaps_have_mean_one_over_rate_and_shape_burstiness(
        burstiness: float, cv: float) -> None:
    g = gaps(arrival_times(MANY, rate=4.0, burstiness=burstiness, seed=0))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.25, rel=0.05)
    # Coefficient of variation of a Gamma(shape k) is 1/sqrt(k): 1 for Poisson.
    assert statistics.pstdev(g) / mean == pytest.approx(cv, rel=0.1)


@needs_data
def test_time_scale_two_halves_the_gaps() -> None:
    trace = load_trace("azure2023-code", data_dir=DEFAULT_DATA_DIR, num_requests=500)
    own = arrival_times(trace)
    fast = arrival_times(trace, time_scale=2.0)
    assert own == [r.arrival_s for r in trace.requests]
    assert fast == pytest.approx([t / 2 for t in own])
    assert fast[-1] == pytest.approx(own[-1] / 2) and own[-1] > 0


def test_untimed_trace_without_rate_asks_for_one() -> None:
    with pytest.raises(ValueError, match="pass --rate"):
        arrival_times(untimed((1, 1)))


@pytest.mark.parametrize("kwargs", [
    {"rate": 0.0}, {"rate": -1.0}, {"rate": 1.0, "burstiness": 0.0},
    {"rate": 1.0, "time_scale": 2.0}, {"time_scale": 0.0},
])
def test_bad_arrival_arguments(kwargs: dict[str, Any]) -> None:
    timed = Trace("t", [TraceRequest(0.0, 1, 1), TraceRequest(1.0, 1, 1)])
    with pytest.raises(ValueError):
        arrival_times(timed, **kwargs)


# --- select --------------------------------------------------------------------------

def test_select_keeps_the_first_requests_within_both_limits() -> None:
    trace = untimed(*[(i + 1, 1) for i in range(10)])
    arrivals = [float(i) for i in range(10)]
    by_duration = select(trace, arrivals, duration_s=4.5)
    assert [r.prompt_tokens for r in by_duration.requests] == [1, 2, 3, 4, 5]
    assert [r.arrival_s for r in by_duration.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert by_duration.timed
    assert len(select(trace, arrivals, max_requests=3, duration_s=4.5).requests) == 3
    assert len(select(trace, arrivals, max_requests=8, duration_s=2.0).requests) == 2
    assert len(select(trace, arrivals).requests) == 10


def test_select_rejects_mismatched_arrivals_and_bad_limits() -> None:
    trace = untimed((1, 1), (2, 2))
    with pytest.raises(ValueError, match="1 arrival times for the 2 requests"):
        select(trace, [0.0])
    with pytest.raises(ValueError, match="max_requests"):
        select(trace, [0.0, 1.0], max_requests=0)
    with pytest.raises(ValueError, match="duration_s"):
        select(trace, [0.0, 1.0], duration_s=-1.0)
