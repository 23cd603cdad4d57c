"""Placement policies on hand-built snapshots: every registered policy runs the same
scenario table, where the expectation is the set of instances a policy may pick (over many
seeds: a deterministic policy has one, a random one its whole reach); then each policy's
own promise, determinism under a seed, and the registry's error."""

from __future__ import annotations

import random

import pytest

from shuffleinfer.scheduler.policies.placement import (
    PLACEMENT_POLICIES,
    PREFILL_PLACEMENT_POLICIES,
    InstanceView,
    LeastLoad,
    PlacementConfig,
    PlacementRequest,
    RoundRobin,
    Shuffle,
    make_placement_policy,
)
from shuffleinfer.scheduler.predictors import bucketed

HEAVY = PlacementRequest("h", 300, bucketed(400, 1024, 200))  # point 400 > 128: heavy
LIGHT = PlacementRequest("l", 300, bucketed(50, 1024, 200))
BIG = PlacementRequest("big", 500, bucketed(250, 1024, 200))  # needs 500 + 200 (lower)


def view(iid: str, running: int, heavy: int = 0, light: int = 0, free: int | None = 10_000,
         decode_tokens: int = 0) -> InstanceView:
    return InstanceView(iid, running, 0, free, heavy, light, decode_tokens)


SCENARIOS: dict[str, tuple[PlacementRequest, list[InstanceView]]] = {
    "a single candidate": (HEAVY, [view("solo", 9, heavy=9, free=0)]),
    "one idle instance among busy ones": (LIGHT, [
        view("d0", 4, 2, 2), view("d1", 0), view("d2", 4, 2, 2)]),
    "heavy request, the least busy instance is all heavy": (HEAVY, [
        view("d0", 4, heavy=4, decode_tokens=1600), view("d1", 6, light=6, decode_tokens=300),
        view("d2", 6, light=6, decode_tokens=300)]),
    "full memory everywhere (empty α)": (BIG, [
        view("d0", 3, free=100), view("d1", 1, free=50), view("d2", 2, free=0)]),
    "only the busiest instance has room (α of one)": (BIG, [
        view("d0", 8, 4, 4, free=5000), view("d1", 1, free=100), view("d2", 1, 0, 1, free=100)]),
}

EXPECTED: dict[str, dict[str, set[str]]] = {
    "least_load": {
        "a single candidate": {"solo"},
        "one idle instance among busy ones": {"d1"},
        "heavy request, the least busy instance is all heavy": {"d0"},
        "full memory everywhere (empty α)": {"d1"},
        "only the busiest instance has room (α of one)": {"d1"},
    },
    "round_robin": {  # a fresh policy starts with the first candidate
        "a single candidate": {"solo"},
        "one idle instance among busy ones": {"d0"},
        "heavy request, the least busy instance is all heavy": {"d0"},
        "full memory everywhere (empty α)": {"d0"},
        "only the busiest instance has room (α of one)": {"d0"},
    },
    "random": {
        "a single candidate": {"solo"},
        "one idle instance among busy ones": {"d0", "d1", "d2"},
        "heavy request, the least busy instance is all heavy": {"d0", "d1", "d2"},
        "full memory everywhere (empty α)": {"d0", "d1", "d2"},
        "only the busiest instance has room (α of one)": {"d0", "d1", "d2"},
    },
    "power_of_two": {  # never the most loaded of three
        "a single candidate": {"solo"},
        "one idle instance among busy ones": {"d0", "d1"},
        "heavy request, the least busy instance is all heavy": {"d0", "d1"},
        "full memory everywhere (empty α)": {"d1", "d2"},
        "only the busiest instance has room (α of one)": {"d1", "d2"},
    },
    "shuffle": {
        "a single candidate": {"solo"},
        # The idle instance has the best mix for a light request, but two random picks
        # may both miss it.
        "one idle instance among busy ones": {"d0", "d1"},
        "heavy request, the least busy instance is all heavy": {"d1", "d2"},
        "full memory everywhere (empty α)": {"d1"},
        "only the busiest instance has room (α of one)": {"d0"},
    },
}

SEEDS = range(64)


def reach(policy: str, request: PlacementRequest, candidates: list[InstanceView]) -> set[str]:
    """Every instance a fresh policy picks first, over many seeds."""
    return {make_placement_policy(policy, rng=random.Random(seed)).place(
        request, candidates).instance_id for seed in SEEDS}


def test_every_registered_policy_has_expectations() -> None:
    assert set(EXPECTED) == set(PLACEMENT_POLICIES)
    for policy, table in EXPECTED.items():
        assert set(table) == set(SCENARIOS), policy


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(PLACEMENT_POLICIES))
def test_scenario_table(policy: str, scenario: str) -> None:
    assert reach(policy, *SCENARIOS[scenario]) == EXPECTED[policy][scenario]


@pytest.mark.parametrize("policy", sorted(PLACEMENT_POLICIES))
def test_same_seed_same_choices(policy: str) -> None:
    candidates = [view(f"d{n}", n % 3, heavy=n % 2, light=n % 4) for n in range(8)]
    requests = [HEAVY, LIGHT, BIG] * 30

    def choices(seed: int) -> list[str]:
        chooser = make_placement_policy(policy, rng=random.Random(seed))
        return [chooser.place(r, candidates).instance_id for r in requests]

    assert choices(7) == choices(7)
    if policy in ("random", "power_of_two", "shuffle"):
        assert choices(7) != choices(8)


def test_only_shuffle_reports_fallbacks_and_only_when_its_rule_cannot_apply() -> None:
    for policy in PLACEMENT_POLICIES:
        for name, (request, candidates) in SCENARIOS.items():
            decision = make_placement_policy(policy, rng=random.Random(0)).place(
                request, candidates)
            expect = "alpha_empty" if policy == "shuffle" and name in (
                "a single candidate", "full memory everywhere (empty α)") else None
            assert decision.fallback == expect, (policy, name)


def test_shuffle_without_a_prediction_falls_back_to_power_of_two() -> None:
    candidates = [view("d0", 5), view("d1", 0), view("d2", 9)]
    unpredicted = PlacementRequest("u", 100)
    for seed in SEEDS:
        decision = Shuffle(rng=random.Random(seed)).place(unpredicted, candidates)
        assert decision.fallback == "no_prediction"
        assert decision.instance_id in {"d0", "d1"}


def test_shuffle_alpha_reads_the_configured_bound_and_keeps_unreported_instances() -> None:
    # BIG needs 500 prompt + 200 (lower) or 400 (upper) tokens.
    candidates = [view("tight", 0, free=800), view("roomy", 5, 5, 0, free=2000)]
    lower = Shuffle(rng=random.Random(0))
    upper = Shuffle(PlacementConfig(kv_bound="upper"), rng=random.Random(0))
    assert {lower.place(BIG, candidates).instance_id for _ in range(20)} == {"tight"}
    assert {upper.place(BIG, candidates).instance_id for _ in range(20)} == {"roomy"}
    unreported = [view("silent", 0, free=None), view("full", 0, free=0)]
    assert {lower.place(BIG, unreported).instance_id for _ in range(20)} == {"silent"}


def test_heavy_threshold_is_configurable() -> None:
    # A 150-token prediction is heavy by default (> 128), light with a 200 threshold.
    # Heavy: "few" gets its second heavy decode, "diluted" would get its third; light:
    # "few" becomes 1:1, "diluted" 2:11 (the lower ratio).
    request = PlacementRequest("r", 10, bucketed(150, 1024, 200))
    candidates = [view("few", 1, heavy=1, light=0), view("diluted", 12, heavy=2, light=10)]
    assert Shuffle(rng=random.Random(0)).place(request, candidates).instance_id == "few"
    lenient = Shuffle(PlacementConfig(heavy_threshold_tokens=200), rng=random.Random(0))
    assert lenient.place(request, candidates).instance_id == "diluted"


def test_least_load_weighs_queued_tokens_before_running_requests() -> None:
    views = [InstanceView("busy-short", num_running_reqs=5, num_queued_prompt_tokens=10),
             InstanceView("idle-long", num_running_reqs=1, num_queued_prompt_tokens=900)]
    assert LeastLoad().place(LIGHT, views).instance_id == "busy-short"
    tied = [InstanceView("b", 2, 0), InstanceView("a", 2, 0), InstanceView("c", 1, 0)]
    assert LeastLoad().place(LIGHT, tied).instance_id == "c"
    # full tie: lowest id, not list order
    assert LeastLoad().place(LIGHT, tied[:2]).instance_id == "a"


def test_round_robin_cycles_whatever_the_load() -> None:
    chooser = RoundRobin()
    views = [InstanceView("x", 0, 0), InstanceView("y", 99, 99_999), InstanceView("z", 0, 0)]
    picks = [chooser.place(LIGHT, views).instance_id for _ in range(7)]
    assert picks == ["x", "y", "z", "x", "y", "z", "x"]


def test_prefill_placement_excludes_policies_that_need_a_prediction() -> None:
    assert set(PREFILL_PLACEMENT_POLICIES) == set(PLACEMENT_POLICIES) - {"shuffle"}


def test_unknown_policy_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'nope'") as err:
        make_placement_policy("nope")
    for name in PLACEMENT_POLICIES:
        assert name in str(err.value)
