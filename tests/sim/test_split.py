"""A simulation split over two processes gives the whole run's result, request for request,
and fails loudly when its prefill side dies."""

from __future__ import annotations

import os

import pytest

from benchmarks.records import TraceRequest
from shuffleinfer.sim import split
from shuffleinfer.sim.simulator import SimConfig, Simulator, simulate
from tests.sim.test_simulator import COSTLY_ATTENTION, SIMPLE, stream


@pytest.mark.parametrize(("config", "cost"), [
    (SimConfig(num_prefill=3, num_decode=5, prefill_policy="power_of_two",
               oracle_accuracy=0.749, kv_capacity_tokens=12_000), SIMPLE),
    (SimConfig(num_prefill=2, num_decode=2, chunk_size=128, admission="reserve_dynamic",
               decode_policy="least_load", oracle_accuracy=0.6, kv_capacity_tokens=6_000,
               request_overhead_s=0.03), COSTLY_ATTENTION),
], ids=["shuffle-oracle", "reserve-dynamic-overhead"])
def test_a_split_run_gives_the_whole_run_s_result(config: SimConfig, cost: object) -> None:
    reqs = stream(3000, seed=3, rate=25.0)
    reqs += [TraceRequest(reqs[-1].arrival_s + 0.01 * i, 40, 1) for i in range(5)]
    whole = simulate(reqs, config, cost)  # type: ignore[arg-type]
    ended = []
    two = split.simulate_in_two(reqs, config, cost, progress=ended.append)  # type: ignore[arg-type]
    assert two.records == whole.records
    assert two.placements == whole.placements
    assert two.busy_s == whole.busy_s and two.duration_s == whole.duration_s
    assert sum(ended) == len(reqs)
    # Both sides did work: every request with more than one token decoded on a decode
    # instance, and every prefill instance prefilled.
    decoded = {d for (_, d), r in zip(two.placements, reqs, strict=True) if r.output_tokens > 1}
    assert decoded <= {f"decode-{i}" for i in range(config.num_decode)}
    assert all(d is None for (_, d), r in zip(two.placements, reqs, strict=True)
               if r.output_tokens == 1)
    assert all(two.busy_s[f"prefill-{i}"] > 0 for i in range(config.num_prefill))


@pytest.mark.parametrize("config", [
    SimConfig(colocated=2),
    SimConfig(num_prefill=2, num_decode=2, flip_policy="idle_or_imbalance"),
], ids=["colocated", "flips"])
def test_what_cannot_split_runs_whole(config: SimConfig) -> None:
    assert not split.splits(config)
    reqs = stream(300, seed=4)
    assert split.simulate_in_two(reqs, config, SIMPLE).records == \
        simulate(reqs, config, SIMPLE).records
    with pytest.raises(ValueError, match="one side"):
        Simulator(config, SIMPLE, side="decode")


def test_a_dead_prefill_side_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(*args: object) -> None:
        os._exit(3)

    monkeypatch.setattr(split, "_prefill_side", dies)
    with pytest.raises(RuntimeError, match="prefill side ended .*exit code 3"):
        split.simulate_in_two(stream(50, seed=1), SimConfig(num_prefill=1, num_decode=1),
                              SIMPLE)
