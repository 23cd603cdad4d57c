"""Placement policies: every registered policy runs the same scenario table through the
global scheduler; then each policy's own promise, and the registry's error."""

from __future__ import annotations

import pytest

from shuffleinfer.scheduler.global_scheduler import GlobalScheduler
from shuffleinfer.scheduler.policies.placement import (
    PLACEMENT_POLICIES,
    InstanceView,
    LeastLoad,
    RoundRobin,
    make_placement_policy,
)

# A scenario is a list of events on a scheduler with prefill p0, p1 and decode d0, d1:
#   ("prefill", req, num_prompt_tokens) and ("decode", req) record the chosen instance,
#   ("done", req) is prefill_done, ("finish", req) is finish.
Event = tuple[str, ...] | tuple[str, str, int]

SCENARIOS: dict[str, list[Event]] = {
    "equal prompts arrive together": [
        ("prefill", "a", 100), ("prefill", "b", 100), ("prefill", "c", 100),
        ("prefill", "d", 100),
    ],
    "one long prompt, then short ones": [
        ("prefill", "a", 1000), ("prefill", "b", 10), ("prefill", "c", 10),
        ("prefill", "d", 10),
    ],
    "a finished prefill frees its instance": [
        ("prefill", "a", 100), ("prefill", "b", 50), ("finish", "b"), ("prefill", "c", 100),
    ],
    "a prefill that is done no longer counts": [
        ("prefill", "a", 100), ("prefill", "b", 300), ("done", "b"), ("prefill", "c", 100),
    ],
    "decode spreads by running requests": [
        ("prefill", "a", 10), ("prefill", "b", 10), ("prefill", "c", 10),
        ("done", "a"), ("decode", "a"), ("done", "b"), ("decode", "b"),
        ("finish", "b"), ("done", "c"), ("decode", "c"),
    ],
}

EXPECTED: dict[str, dict[str, list[str]]] = {
    "least_load": {
        "equal prompts arrive together": ["p0", "p1", "p0", "p1"],
        "one long prompt, then short ones": ["p0", "p1", "p1", "p1"],
        "a finished prefill frees its instance": ["p0", "p1", "p1"],
        "a prefill that is done no longer counts": ["p0", "p1", "p1"],
        "decode spreads by running requests": ["p0", "p1", "p0", "d0", "d1", "d1"],
    },
    "round_robin": {
        "equal prompts arrive together": ["p0", "p1", "p0", "p1"],
        "one long prompt, then short ones": ["p0", "p1", "p0", "p1"],
        "a finished prefill frees its instance": ["p0", "p1", "p0"],
        "a prefill that is done no longer counts": ["p0", "p1", "p0"],
        "decode spreads by running requests": ["p0", "p1", "p0", "d0", "d1", "d0"],
    },
}


def run(policy: str, events: list[Event]) -> tuple[list[str], GlobalScheduler]:
    sched = GlobalScheduler(["p0", "p1"], ["d0", "d1"], prefill_policy=policy,
                            decode_policy=policy)
    placed: list[str] = []
    for kind, req, *rest in events:
        if kind == "prefill":
            placed.append(sched.schedule_prefill(str(req), int(rest[0])))
        elif kind == "decode":
            placed.append(sched.schedule_decode(str(req)))
        elif kind == "done":
            sched.prefill_done(str(req))
        else:
            sched.finish(str(req))
    return placed, sched


def test_every_registered_policy_has_expectations() -> None:
    # A new policy must say how it behaves in every scenario below.
    assert set(EXPECTED) == set(PLACEMENT_POLICIES)
    for policy, table in EXPECTED.items():
        assert set(table) == set(SCENARIOS), policy


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(PLACEMENT_POLICIES))
def test_scenario_table(policy: str, scenario: str) -> None:
    placed, sched = run(policy, SCENARIOS[scenario])
    assert placed == EXPECTED[policy][scenario]

    # Whatever the policy, finishing every request leaves no load behind.
    for _kind, req, *_ in SCENARIOS[scenario]:
        sched.finish(str(req))
    assert set(sched.num_inflight().values()) == {0}


@pytest.mark.parametrize("policy", sorted(PLACEMENT_POLICIES))
def test_policy_picks_among_the_candidates_given(policy: str) -> None:
    chooser = make_placement_policy(policy)
    only = [InstanceView("solo", num_running_reqs=50, num_queued_prompt_tokens=10_000)]
    assert [chooser.place(only) for _ in range(3)] == ["solo"] * 3
    three = [InstanceView(f"i{n}", n, 100 * n) for n in range(3)]
    assert {chooser.place(three) for _ in range(10)} <= {"i0", "i1", "i2"}


def test_least_load_weighs_queued_tokens_before_running_requests() -> None:
    views = [InstanceView("busy-short", num_running_reqs=5, num_queued_prompt_tokens=10),
             InstanceView("idle-long", num_running_reqs=1, num_queued_prompt_tokens=900)]
    assert LeastLoad().place(views) == "busy-short"
    tied = [InstanceView("b", 2, 0), InstanceView("a", 2, 0), InstanceView("c", 1, 0)]
    assert LeastLoad().place(tied) == "c"
    assert LeastLoad().place(tied[:2]) == "a"  # full tie: lowest id, not list order


def test_round_robin_cycles_whatever_the_load() -> None:
    chooser = RoundRobin()
    views = [InstanceView("x", 0, 0), InstanceView("y", 99, 99_999), InstanceView("z", 0, 0)]
    assert [chooser.place(views) for _ in range(7)] == ["x", "y", "z", "x", "y", "z", "x"]


def test_unknown_policy_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'nope'") as err:
        make_placement_policy("nope")
    for name in PLACEMENT_POLICIES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="least_load"):
        GlobalScheduler(["p0"], ["d0"], decode_policy="fastest")
