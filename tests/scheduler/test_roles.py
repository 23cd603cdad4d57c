"""Drain, resume and flip at the scheduler: which instances get work, when a flip ends,
and that no role is ever left without an instance taking work."""

from __future__ import annotations

import pytest

from shuffleinfer.protocol import InstanceLoad, RoleChangeError, UnknownInstanceError
from shuffleinfer.scheduler.global_scheduler import GlobalScheduler, NoInstanceError
from shuffleinfer.scheduler.policies.flip import FlipConfig
from shuffleinfer.scheduler.prediction import Prediction


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def idle(instance_id: str, role: str = "prefill", **fields: object) -> InstanceLoad:
    return InstanceLoad(instance_id, role, ready=True, **fields)  # type: ignore[arg-type]


def report(s: GlobalScheduler, **busy: int) -> list:
    """One monitor tick: every instance idle unless given a running count."""
    loads = [idle(i, num_running_reqs=busy.get(i.replace("-", "_"), 0))
             for i in s.roster.ids()]
    return s.on_monitor(loads)


def test_a_drained_instance_gets_no_new_work_until_resumed() -> None:
    s = GlobalScheduler(["p0", "p1"], ["d0"], prefill_policy="round_robin")
    assert s.drain("p0") == "draining"
    assert {s.schedule_prefill(f"r{i}", 10) for i in range(4)} == {"p1"}
    assert s.resume("p0") == "active"
    assert {s.schedule_prefill(f"q{i}", 10) for i in range(4)} == {"p0", "p1"}


def test_the_last_instance_of_a_role_cannot_drain_or_flip() -> None:
    s = GlobalScheduler(["p0"], ["d0", "d1"])
    with pytest.raises(RoleChangeError, match="last prefill instance"):
        s.drain("p0")
    with pytest.raises(RoleChangeError, match="last prefill instance"):
        s.flip("p0")
    s.drain("d0")
    with pytest.raises(RoleChangeError, match="last decode instance"):
        s.flip("d1")
    with pytest.raises(RoleChangeError, match="already a decode"):
        s.flip("d0", "decode")
    with pytest.raises(UnknownInstanceError, match="no instance 'x'; known: p0, d0, d1"):
        s.drain("x")


def test_a_flip_waits_until_the_instance_holds_nothing_then_changes_role() -> None:
    s = GlobalScheduler(["p0", "p1"], ["d0"], prefill_policy="round_robin")
    held = [s.schedule_prefill(f"r{i}", 10) for i in range(2)]
    assert held == ["p0", "p1"]
    assert s.flip("p0") == "flipping"
    assert [s.schedule_prefill(f"q{i}", 10) for i in range(2)] == ["p1", "p1"]
    assert report(s) == []  # r0 is still prefilling on p0
    s.prefill_done("r0")
    s.schedule_decode("r0")
    assert report(s, p0=1) == []  # the engine still reports it busy
    changes = report(s)
    assert [(c.instance_id, c.role) for c in changes] == [("p0", "decode")]
    assert s.roles()["p0"] == ("decode", "active")
    assert s.roster.num_flips == 1
    # Its decode moved with it: new decodes now spread over d0 and p0.
    decodes = set()
    for i in range(2):
        s.prefill_done(f"q{i}")
        decodes.add(s.schedule_decode(f"q{i}"))
    assert decodes <= {"d0", "p0"}
    with pytest.raises(RoleChangeError, match="last prefill instance"):
        s.flip("p1")


def test_a_flipping_instance_cannot_be_resumed_or_flipped_again() -> None:
    s = GlobalScheduler(["p0", "p1"], ["d0"])
    s.flip("p1")
    with pytest.raises(RoleChangeError, match="flipping to decode"):
        s.resume("p1")
    with pytest.raises(RoleChangeError, match="already flipping"):
        s.flip("p1")
    with pytest.raises(RoleChangeError, match="flipping"):
        s.drain("p1")


def test_an_unreachable_instance_never_finishes_a_flip() -> None:
    s = GlobalScheduler(["p0", "p1"], ["d0"])
    s.flip("p1")
    loads = [idle("p0"), InstanceLoad("p1", "prefill", ready=False), idle("d0", "decode")]
    assert s.on_monitor(loads) == []
    assert s.roles()["p1"] == ("prefill", "flipping")


def test_the_flip_policy_moves_an_idle_instance_to_the_busy_role() -> None:
    clock = Clock()
    s = GlobalScheduler(["p0", "p1"], ["d0"], flip_policy="idle", clock=clock,
                        flip_config=FlipConfig(flip_idle_s=60))
    s.schedule_prefill("r0", 10)  # p0 busy, p1 idle; the decode instance busy
    s.on_monitor([idle("p0"), idle("p1"), idle("d0", "decode", num_running_reqs=3)])
    clock.now = 59
    s.on_monitor([idle("p0"), idle("p1"), idle("d0", "decode", num_running_reqs=3)])
    assert s.roles()["p1"] == ("prefill", "active")
    clock.now = 61
    s.on_monitor([idle("p0"), idle("p1"), idle("d0", "decode", num_running_reqs=3)])
    assert s.roles()["p1"] == ("prefill", "flipping")
    changes = s.on_monitor([idle("p0"), idle("p1"), idle("d0", "decode", num_running_reqs=3)])
    assert [(c.instance_id, c.role) for c in changes] == [("p1", "decode")]


def test_no_instance_taking_work_is_a_clear_error() -> None:
    s = GlobalScheduler(["p0", "p1"], ["d0"])
    s.drain("p0")
    s.roster._members["p1"].state = "draining"  # only reachable by a race; still handled
    with pytest.raises(NoInstanceError, match="no prefill instance takes work"):
        s.schedule_prefill("r", 10)


def test_reported_free_kv_steers_shuffle_and_counts_placements_since() -> None:
    s = GlobalScheduler(["p0"], ["d0", "d1"], decode_policy="shuffle")
    s.on_monitor([idle("p0"), idle("d0", "decode", num_free_kv_tokens=100),
                  idle("d1", "decode", num_free_kv_tokens=5000)])
    need = Prediction(lower=200, upper=250, point=220, bucket=4)
    for i in range(3):  # only d1 has room for 10 + 200 tokens
        s.schedule_prefill(f"r{i}", 10)
        s.prefill_done(f"r{i}")
        assert s.schedule_decode(f"r{i}", need) == "d1"
    views = {v.instance_id: v for v in s._views(["d0", "d1"])}
    assert views["d1"].num_free_kv_tokens == 5000 - 3 * 11
