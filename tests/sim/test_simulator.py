"""The simulator: hand-checkable timings, every request ending exactly once, the same
result for the same seed, and the real policy objects in charge."""

from __future__ import annotations

import dataclasses
import random

import pytest

from benchmarks.records import TraceRequest
from shuffleinfer.sim.cost import LinearCost
from shuffleinfer.sim.simulator import SimConfig, Simulator, simulate

# Round numbers: a prefill step costs 10 ms + 1 ms per token (no attention term); a
# decode step 5 ms + 1 ms per running decode (no context term); KV moves at 1 token/ms.
SIMPLE = LinearCost("simple", prefill_base_s=0.010, prefill_per_token_s=0.001,
                    prefill_per_attn_s=0.0, decode_base_s=0.005, decode_per_req_s=0.001,
                    decode_per_ctx_s=0.0, kv_bytes_per_token=1.0, link_bytes_per_s=1000.0)

COSTLY_ATTENTION = LinearCost("attention", prefill_base_s=0.010, prefill_per_token_s=0.0005,
                              prefill_per_attn_s=1e-6, decode_base_s=0.005,
                              decode_per_req_s=0.001, decode_per_ctx_s=1e-5,
                              kv_bytes_per_token=1.0, link_bytes_per_s=5000.0)
"""Each chunk of a prompt costs more than the one before (attention over what is done)."""


def stream(n: int, seed: int, rate: float = 20.0) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(10, 900), rng.randint(1, 300)))
    return out


def test_two_requests_by_hand() -> None:
    # A (100 prompt tokens, 3 output) at 0; B (50, 2) at 0.05 s; one prefill, one decode.
    reqs = [TraceRequest(0.0, 100, 3), TraceRequest(0.05, 50, 2)]
    a, b = simulate(reqs, SimConfig(num_prefill=1, num_decode=1, chunk_size=512), SIMPLE).records
    # A: prefill step 10 + 100 = 110 ms; hand-over 100 ms; then 2 decode steps of 6 ms.
    assert a.first_token_at_s == pytest.approx(0.110)
    # B waits for A's step, then 10 + 50 ms: first token at 0.170, KV at 0.220. A decodes
    # alone from 0.210: steps end at 0.216 and 0.222 (its end). B arrived during the
    # second step, so it decodes its one token after it, alone: 0.222 + 6 ms.
    assert b.first_token_at_s == pytest.approx(0.170)
    assert a.finished_at_s == pytest.approx(0.222)
    assert b.finished_at_s == pytest.approx(0.228)


def test_a_request_finished_by_its_first_token_never_decodes() -> None:
    (r,) = simulate([TraceRequest(0.0, 20, 1)], SimConfig(), SIMPLE).records
    assert r.first_token_at_s == r.finished_at_s == pytest.approx(0.030)


def test_colocated_steps_mix_prompt_chunks_and_decodes() -> None:
    # One vLLM instance, chunk 64: A's 100-token prompt takes two steps (64, then 36 with
    # nothing else); B arrives during the first and its 20 tokens share the second step.
    reqs = [TraceRequest(0.0, 100, 3), TraceRequest(0.01, 20, 2)]
    a, b = simulate(reqs, SimConfig(colocated=1, chunk_size=64), SIMPLE).records
    assert a.first_token_at_s == pytest.approx(0.074 + 0.066)  # 10+64, then 10+36+20
    assert b.first_token_at_s == a.first_token_at_s
    # Then decode-only steps with 2 decodes: 7 ms each; B needs 1 more, A 2 more.
    assert b.finished_at_s == pytest.approx(0.140 + 0.007)
    assert a.finished_at_s == pytest.approx(0.140 + 0.007 + 0.006)


def test_colocated_prefill_first_runs_whole_prompts_while_decodes_wait() -> None:
    # vLLM before chunked prefill: A's 100 tokens run whole in one step (110 ms); B arrives
    # during it, and its prompt runs alone next (30 ms) while A's decode waits; then both
    # decode (7 ms a step).
    reqs = [TraceRequest(0.0, 100, 3), TraceRequest(0.01, 20, 2)]
    config = SimConfig(colocated=1, colocated_chunked=False)
    a, b = simulate(reqs, config, SIMPLE).records
    assert a.first_token_at_s == pytest.approx(0.110)
    assert b.first_token_at_s == pytest.approx(0.140)
    assert b.finished_at_s == pytest.approx(0.147)
    assert a.finished_at_s == pytest.approx(0.153)


def test_a_colocated_instance_starts_a_prompt_only_while_its_kv_has_room() -> None:
    # KV for 150 tokens. A (100 prompt, 4 output) holds 100-103 tokens while it decodes,
    # so B (60 prompt), arriving during A's prefill, waits until A ends: 110 ms prefill,
    # then 3 decode steps of 6 ms; B's prefill 10 + 60 ms after that.
    reqs = [TraceRequest(0.0, 100, 4), TraceRequest(0.01, 60, 2)]
    a, b = simulate(reqs, SimConfig(colocated=1, kv_capacity_tokens=150), SIMPLE).records
    assert a.finished_at_s == pytest.approx(0.110 + 3 * 0.006)
    assert b.first_token_at_s == pytest.approx(a.finished_at_s + 0.070)
    # With room for both, B's prompt shares A's first decode step.
    a, b = simulate(reqs, SimConfig(colocated=1, kv_capacity_tokens=1000), SIMPLE).records
    assert b.first_token_at_s == pytest.approx(0.110 + 0.010 + 0.060 + 0.001)


@pytest.mark.parametrize("config", [
    SimConfig(num_prefill=2, num_decode=3, chunk_size=256, kv_capacity_tokens=20_000),
    SimConfig(num_prefill=2, num_decode=2, admission="reserve_dynamic", oracle_accuracy=0.6,
              kv_capacity_tokens=8_000, flip_policy="idle_or_imbalance"),
    SimConfig(colocated=3, chunk_size=256),
    SimConfig(colocated=2, chunk_size=1024, colocated_chunked=False, kv_capacity_tokens=9_000),
], ids=["disaggregated", "tight-kv-flips", "colocated", "colocated-prefill-first"])
def test_every_request_ends_once_and_in_order_of_its_life(config: SimConfig) -> None:
    reqs = stream(600, seed=1)
    result = simulate(reqs, config, SIMPLE)
    assert len(result.records) == len(reqs) and all(r.ok for r in result.records)
    for r, t in zip(result.records, reqs, strict=True):
        assert r.output_tokens == t.output_tokens
        assert t.arrival_s < r.first_token_at_s <= r.finished_at_s
    busy = sum(result.busy_s.values())
    assert 0 < busy <= result.num_instances * result.duration_s


@pytest.mark.parametrize(("config", "rate"), [
    (SimConfig(num_prefill=3, num_decode=3, chunk_size=64, prefill_policy="least_load",
               flip_policy="idle_or_imbalance", kv_capacity_tokens=8_000), 3.0),
    (SimConfig(num_prefill=2, num_decode=2, chunk_size=32, monitor_interval_s=0.02), 3.0),
    (SimConfig(colocated=3, chunk_size=64), 0.5),  # (idle enough to have lone prompts)
], ids=["least-load-flips", "small-chunks", "colocated"])
def test_a_lone_prompt_s_chunks_as_one_event_change_nothing(
        config: SimConfig, rate: float, monkeypatch: pytest.MonkeyPatch) -> None:
    from shuffleinfer.sim.instance import SimInstance

    reqs = stream(500, seed=5, rate=rate)
    as_one = []
    start_lone_prompt = SimInstance._start_lone_prompt

    def counted(self: SimInstance, now: float) -> object:
        step = start_lone_prompt(self, now)
        as_one.append(step is not None)
        return step

    monkeypatch.setattr(SimInstance, "_start_lone_prompt", counted)
    fast = simulate(reqs, config, COSTLY_ATTENTION)
    assert sum(as_one) >= 10  # (the case is exercised)
    monkeypatch.setattr(SimInstance, "lone_prompt_as_one_event", False)
    chunk_by_chunk = simulate(reqs, config, COSTLY_ATTENTION)
    assert fast.placements == chunk_by_chunk.placements
    assert fast.num_flips == chunk_by_chunk.num_flips
    for a, b in zip(fast.records, chunk_by_chunk.records, strict=True):
        assert a.first_token_at_s == pytest.approx(b.first_token_at_s, abs=1e-9)
        assert a.finished_at_s == pytest.approx(b.finished_at_s, abs=1e-9)


def test_same_seed_same_result_other_seed_other_result() -> None:
    config = SimConfig(num_prefill=2, num_decode=4, decode_policy="shuffle",
                       oracle_accuracy=0.7, seed=3)
    reqs = stream(400, seed=2)

    def times(c: SimConfig) -> list[tuple[float | None, float | None]]:
        return [(r.first_token_at_s, r.finished_at_s) for r in simulate(reqs, c, SIMPLE).records]

    assert times(config) == times(config)
    assert times(config) != times(dataclasses.replace(config, seed=4))


def test_the_configured_policy_objects_place_the_requests() -> None:
    reqs = stream(200, seed=5)
    config = SimConfig(num_prefill=3, num_decode=2, prefill_policy="round_robin",
                       decode_policy="round_robin")
    result = simulate(reqs, config, SIMPLE)
    prefills = [p for p, _ in result.placements]
    assert prefills == [f"prefill-{i % 3}" for i in range(len(reqs))]
    # Decodes are placed as prefills finish (not in request order): round robin splits them
    # evenly.
    decodes = [d for _, d in result.placements if d is not None]
    assert abs(decodes.count("decode-0") - decodes.count("decode-1")) <= 1
    # One output token ends at the prefill: no decode placed.
    assert len(decodes) == sum(r.output_tokens > 1 for r in reqs)


def test_an_unknown_policy_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="known: fcfs, ljf, sjf"):
        Simulator(SimConfig(prefill_order="fastest"), SIMPLE)


def test_a_cluster_without_a_role_is_refused() -> None:
    with pytest.raises(ValueError, match="at least|>= 1"):
        SimConfig(num_prefill=0, num_decode=2)
