"""The global scheduler's request table: where each leg goes and what load it leaves."""

from __future__ import annotations

import random

import pytest

from shuffleinfer.protocol import InstanceLoad
from shuffleinfer.scheduler.global_scheduler import GlobalScheduler, NoInstanceError
from shuffleinfer.scheduler.prediction import Prediction
from shuffleinfer.scheduler.predictors import bucketed

HEAVY = bucketed(400, 1024, 200)
LIGHT = bucketed(50, 1024, 200)


def test_least_load_spreads_concurrent_prompts_by_queued_tokens() -> None:
    sched = GlobalScheduler(["p0", "p1"], ["d0"])
    placed = {req: sched.schedule_prefill(req, tokens)
              for req, tokens in [("a", 400), ("b", 100), ("c", 100), ("d", 100)]}
    # p1 takes the three short prompts (300 tokens) while p0 works through the long one.
    assert placed == {"a": "p0", "b": "p1", "c": "p1", "d": "p1"}
    assert sched.num_inflight() == {"p0": 1, "p1": 3, "d0": 0}


def test_whole_life_of_requests_across_both_legs() -> None:
    sched = GlobalScheduler(["p0", "p1"], ["d0", "d1"])
    assert sched.schedule_prefill("a", 200) == "p0"
    assert sched.schedule_prefill("b", 200) == "p1"
    sched.prefill_done("a")
    assert sched.num_inflight() == {"p0": 0, "p1": 1, "d0": 0, "d1": 0}
    assert sched.schedule_decode("a") == "d0"
    sched.prefill_done("b")
    assert sched.schedule_decode("b") == "d1"
    assert sched.num_inflight() == {"p0": 0, "p1": 0, "d0": 1, "d1": 1}

    sched.finish("a")
    sched.finish("a")  # finishing twice (abort racing completion) is harmless
    assert sched.num_inflight() == {"p0": 0, "p1": 0, "d0": 0, "d1": 1}
    # The freed decode instance gets the next request.
    sched.schedule_prefill("c", 10)
    sched.prefill_done("c")
    assert sched.schedule_decode("c") == "d0"


def test_request_finished_after_its_first_token_never_reaches_decode() -> None:
    sched = GlobalScheduler(["p0"], ["d0"])
    sched.schedule_prefill("a", 50)
    sched.prefill_done("a")
    sched.finish("a")
    assert set(sched.num_inflight().values()) == {0}
    # Its id can be used again once it is gone.
    assert sched.schedule_prefill("a", 50) == "p0"


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        GlobalScheduler([], ["d0"])
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        GlobalScheduler(["p0"], [])
    sched = GlobalScheduler(["p0"], ["d0"])
    sched.schedule_prefill("a", 10)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.schedule_prefill("a", 10)
    with pytest.raises(ValueError, match="not scheduled"):
        sched.schedule_decode("ghost")
    sched.prefill_done("ghost")  # late news about a finished request is ignored
    sched.finish("ghost")
    with pytest.raises(ValueError, match="'fastest'.*least_load"):
        GlobalScheduler(["p0"], ["d0"], decode_policy="fastest")


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


# The deterministic policies through the scheduler's table (every policy's own table is in
# test_placement.py).
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_scenario_table(policy: str, scenario: str) -> None:
    placed, sched = run(policy, SCENARIOS[scenario])
    assert placed == EXPECTED[policy][scenario]

    # Whatever the policy, finishing every request leaves no load behind.
    for _kind, req, *_ in SCENARIOS[scenario]:
        sched.finish(str(req))
    assert set(sched.num_inflight().values()) == {0}


def test_shuffle_places_decodes_only() -> None:
    with pytest.raises(ValueError, match="prefill placement policy 'shuffle'.*least_load"):
        GlobalScheduler(["p0"], ["d0"], prefill_policy="shuffle")
    GlobalScheduler(["p0"], ["d0"], decode_policy="shuffle")


def test_predictions_given_at_decode_time_steer_shuffle() -> None:
    # Two decode instances: shuffle's two random picks are always both, so it is
    # deterministic and follows the heavy:light mix the table counts.
    sched = GlobalScheduler(["p0"], ["d0", "d1"], decode_policy="shuffle",
                            rng=random.Random(0))

    def decode(req: str, prediction: Prediction) -> str:
        sched.schedule_prefill(req, 100)
        sched.prefill_done(req)
        return sched.schedule_decode(req, prediction)

    assert decode("h1", HEAVY) == "d0"  # 1:0 either way; same heavy count; lowest id
    assert decode("h2", HEAVY) == "d1"  # d0 would hold 2 heavy, d1 one
    assert decode("l1", LIGHT) == "d0"  # both 1:1 after; d0 first by id
    assert decode("h3", HEAVY) == "d0"  # 2:1 on d0 beats 2:0 on d1
    sched.finish("h3")
    sched.finish("l1")
    assert decode("l2", LIGHT) == "d0"  # 1:1 on d0 vs 1:1 on d1: the tie goes by id
    assert sched.num_fallbacks == {}


def test_a_decode_without_prediction_is_placed_and_counted_as_a_fallback() -> None:
    sched = GlobalScheduler(["p0"], ["d0", "d1"], decode_policy="shuffle",
                            rng=random.Random(0))
    for req in ("a", "b", "c"):
        sched.schedule_prefill(req, 10)
        sched.prefill_done(req)
        assert sched.schedule_decode(req) in {"d0", "d1"}
    assert sched.num_fallbacks == {"no_prediction": 3}


def test_instances_the_monitor_cannot_reach_and_the_ones_to_avoid_get_no_work() -> None:
    sched = GlobalScheduler(["p0", "p1"], ["d0", "d1"])
    reachable = [InstanceLoad("p1", "prefill", ready=True),
                 InstanceLoad("d0", "decode", ready=True),
                 InstanceLoad("d1", "decode", ready=False)]  # restarting
    sched.on_monitor(reachable)  # p0 did not answer: dead
    assert {sched.schedule_prefill(r, 10) for r in "abc"} == {"p1"}
    for r in "abc":
        sched.prefill_done(r)
    assert {sched.schedule_decode(r) for r in "abc"} == {"d0"}
    # A retry avoids where its leg just died. With no reached instance left it tries
    # the unreached ones (busy ones miss ticks); with none at all it is refused (503).
    assert sched.schedule_prefill("x", 10, avoid=["p1"]) == "p0"
    sched.finish("x")
    with pytest.raises(NoInstanceError, match="no prefill instance"):
        sched.schedule_prefill("x", 10, avoid=["p0", "p1"])
    sched.on_monitor([InstanceLoad(i, "prefill" if i[0] == "p" else "decode", ready=True)
                      for i in ("p0", "p1", "d0", "d1")])  # both back
    assert sched.schedule_prefill("y", 10, avoid=["p1"]) == "p0"
