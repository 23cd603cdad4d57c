"""The global scheduler's request table: where each leg goes and what load it leaves."""

from __future__ import annotations

import pytest

from shuffleinfer.scheduler.global_scheduler import GlobalScheduler


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
