"""Decode admission: every policy runs the same scenario table; then the promises that
hold on any snapshot (seeded random ones): nothing admitted past what the policy reserves
against, admission is a prefix of the queue, and greedy admits at least what
reserve_dynamic does, which admits at least what reserve_static does."""

from __future__ import annotations

import random

import pytest

from shuffleinfer.scheduler.policies.admission import (
    ADMISSION_POLICIES,
    AdmissionConfig,
    AdmissionSnapshot,
    RunningDecode,
    WaitingDecode,
    make_admission_policy,
)
from shuffleinfer.scheduler.predictors import bucketed


def waiting(req_id: str, num_prompt_tokens: int, predicted_output: int) -> WaitingDecode:
    # bucketed(): 200-token buckets, so a point of 250 has lower bound 200.
    return WaitingDecode(req_id, num_prompt_tokens, bucketed(predicted_output, 4096, 200))


SCENARIOS: dict[str, AdmissionSnapshot] = {
    "nothing waits": AdmissionSnapshot([], [RunningDecode("r", 100, 10)], 1000),
    "everything fits with room to grow": AdmissionSnapshot(
        [waiting("a", 100, 250), waiting("b", 100, 250)], [], 10_000),
    # a holds 601 tokens now and will hold 600 + 600 (lower bound) = 1,200.
    "fits now but not its predicted growth": AdmissionSnapshot(
        [waiting("a", 600, 650)],
        [RunningDecode("soon-done", 500, 10), RunningDecode("long", 300, 500)], 1000),
    "full memory": AdmissionSnapshot([waiting("a", 10, 10)], [RunningDecode("r", 900, 5)], 0),
    "a large request at the head blocks the queue": AdmissionSnapshot(
        [waiting("big", 2000, 10), waiting("small", 10, 10)], [], 1000),
    # Each needs 201 now and 400 predicted; the running request frees 400 soon.
    "reservations add up": AdmissionSnapshot(
        [waiting("a", 200, 250), waiting("b", 200, 250), waiting("c", 200, 250)],
        [RunningDecode("r", 400, 5)], 1000),
}

EXPECTED: dict[str, dict[str, str]] = {
    "greedy": {
        "nothing waits": "",
        "everything fits with room to grow": "ab",
        "fits now but not its predicted growth": "a",
        "full memory": "",
        "a large request at the head blocks the queue": "",
        "reservations add up": "abc",
    },
    "reserve_static": {
        "nothing waits": "",
        "everything fits with room to grow": "ab",
        "fits now but not its predicted growth": "",
        "full memory": "",
        "a large request at the head blocks the queue": "",
        "reservations add up": "ab",
    },
    "reserve_dynamic": {
        "nothing waits": "",
        "everything fits with room to grow": "ab",
        "fits now but not its predicted growth": "a",
        "full memory": "",
        "a large request at the head blocks the queue": "",
        "reservations add up": "abc",
    },
}


def test_every_registered_policy_has_expectations() -> None:
    assert set(EXPECTED) == set(ADMISSION_POLICIES)
    for policy, table in EXPECTED.items():
        assert set(table) == set(SCENARIOS), policy


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(ADMISSION_POLICIES))
def test_scenario_table(policy: str, scenario: str) -> None:
    decision = make_admission_policy(policy).schedule(SCENARIOS[scenario])
    assert "".join(decision.admit) == EXPECTED[policy][scenario]


def random_snapshots(seed: int, count: int = 500) -> list[AdmissionSnapshot]:
    rng = random.Random(seed)
    snapshots = []
    for n in range(count):
        queue = [waiting(f"w{n}.{i}", rng.randint(1, 1500), rng.randint(0, 1200))
                 for i in range(rng.randint(0, 12))]
        running = [RunningDecode(f"r{n}.{i}", rng.randint(2, 2000), rng.randint(0, 1000))
                   for i in range(rng.randint(0, 6))]
        snapshots.append(AdmissionSnapshot(queue, running, rng.randint(0, 8000)))
    return snapshots


def predicted_kv(req: WaitingDecode) -> int:
    return req.num_prompt_tokens + max(req.prediction.lower, req.num_output_tokens)


def test_reserve_policies_never_admit_past_the_kv_they_predict() -> None:
    static = make_admission_policy("reserve_static")
    dynamic = make_admission_policy("reserve_dynamic")
    for snap in random_snapshots(seed=1):
        by_id = {w.req_id: w for w in snap.waiting}
        admitted = [by_id[r] for r in static.schedule(snap).admit]
        assert sum(predicted_kv(w) for w in admitted) <= snap.num_free_kv_tokens

        admitted = [by_id[r] for r in dynamic.schedule(snap).admit]
        freed = max((r.num_kv_tokens for r in snap.running if r.num_predicted_remaining_tokens
                     == min(x.num_predicted_remaining_tokens for x in snap.running)),
                    default=0)
        assert sum(w.num_kv_tokens for w in admitted) <= snap.num_free_kv_tokens
        assert sum(predicted_kv(w) for w in admitted) <= snap.num_free_kv_tokens + freed


def test_greedy_never_admits_past_free_kv_now() -> None:
    greedy = make_admission_policy("greedy")
    for snap in random_snapshots(seed=2):
        by_id = {w.req_id: w for w in snap.waiting}
        admitted = greedy.schedule(snap).admit
        assert sum(by_id[r].num_kv_tokens for r in admitted) <= snap.num_free_kv_tokens


def test_admission_is_a_prefix_and_the_policies_nest() -> None:
    policies = {name: make_admission_policy(name) for name in ADMISSION_POLICIES}
    admitted_any = 0
    for snap in random_snapshots(seed=3):
        ids = [w.req_id for w in snap.waiting]
        n = {name: len(p.schedule(snap).admit) for name, p in policies.items()}
        for name, p in policies.items():
            assert list(p.schedule(snap).admit) == ids[:n[name]], name
        assert n["greedy"] >= n["reserve_dynamic"] >= n["reserve_static"]
        admitted_any += n["reserve_static"] > 0
    assert admitted_any > 50  # the snapshots are not all hopeless


def test_the_reserved_estimate_is_configurable() -> None:
    # 100-token prompt, predicted 250 (bucket 200-400): lower needs 300, upper 500.
    snap = AdmissionSnapshot([waiting("a", 100, 250)], [], 400)
    assert make_admission_policy("reserve_static").schedule(snap).admit == ("a",)
    upper = make_admission_policy("reserve_static", AdmissionConfig(kv_bound="upper"))
    assert upper.schedule(snap).admit == ()


def test_unknown_admission_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'lazy'.*greedy, reserve_dynamic, reserve_static"):
        make_admission_policy("lazy")
