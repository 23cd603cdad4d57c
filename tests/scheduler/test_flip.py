"""Flip: every policy runs the same scenario table (a timed series of cluster snapshots in,
the proposal at each step out); then, on a seeded random cluster that carries proposals
out, no role ever runs out of instances."""

from __future__ import annotations

import random

import pytest

from shuffleinfer.scheduler.policies.flip import (
    FLIP_POLICIES,
    ClusterSnapshot,
    FlipConfig,
    FlipDecision,
    InstanceRole,
    Role,
    make_flip_policy,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def role_of(iid: str) -> Role:
    return "prefill" if iid.startswith("p") else "decode"


def busy(iid: str, running: int = 3) -> InstanceRole:
    return InstanceRole(iid, role_of(iid), running, None)


def idle(iid: str, since_at: float) -> InstanceRole:
    return InstanceRole(iid, role_of(iid), 0, since_at)


def cluster(*instances: InstanceRole, delay_s: float = 0.5,
            utilisation: float = 0.6) -> ClusterSnapshot:
    return ClusterSnapshot(instances, delay_s, utilisation)


BALANCED = cluster(busy("p0"), busy("p1"), busy("d0"), busy("d1"))
PREFILL_SHORT = cluster(busy("p0"), busy("d0", 1), busy("d1", 2), delay_s=5.0,
                        utilisation=0.1)
DECODE_SHORT = cluster(busy("p0", 1), busy("p1", 0), busy("d0"), delay_s=0.0,
                       utilisation=0.95)

# A scenario: (time, snapshot) steps; defaults: flip_idle_s 60, sustain_s 10.
SCENARIOS: dict[str, list[tuple[float, ClusterSnapshot]]] = {
    "all busy and balanced": [(0, BALANCED), (100, BALANCED)],
    "a prefill idle for a minute while decode is busy": [
        (61, cluster(idle("p0", 0), busy("p1"), busy("d0")))],
    "a prefill idle for half a minute": [(30, cluster(idle("p0", 0), busy("p1"), busy("d0")))],
    "the other role has idle instances too": [
        (100, cluster(idle("p0", 0), busy("p1"), idle("d0", 0), busy("d1")))],
    "the only instance of its role is idle": [(100, cluster(idle("p0", 0), busy("d0")))],
    "prefill queues back up while decode idles": [(0, PREFILL_SHORT), (10, PREFILL_SHORT)],
    "an imbalance too short to act on": [(0, PREFILL_SHORT), (9, PREFILL_SHORT)],
    "an imbalance interrupted": [(0, PREFILL_SHORT), (5, BALANCED), (12, PREFILL_SHORT)],
    "decode saturated while prefill has nothing queued": [
        (0, DECODE_SHORT), (10, DECODE_SHORT), (15, DECODE_SHORT), (20, DECODE_SHORT)],
}

IDLE_P0 = FlipDecision("p0", "prefill", "decode", "idle")
TO_PREFILL = FlipDecision("d0", "decode", "prefill", "imbalance")
TO_DECODE = FlipDecision("p1", "prefill", "decode", "imbalance")

EXPECTED: dict[str, dict[str, list[FlipDecision | None]]] = {
    "never": {name: [None] * len(steps) for name, steps in SCENARIOS.items()},
    "idle": {
        "all busy and balanced": [None, None],
        "a prefill idle for a minute while decode is busy": [IDLE_P0],
        "a prefill idle for half a minute": [None],
        "the other role has idle instances too": [None],
        "the only instance of its role is idle": [None],
        "prefill queues back up while decode idles": [None, None],
        "an imbalance too short to act on": [None, None],
        "an imbalance interrupted": [None, None, None],
        "decode saturated while prefill has nothing queued": [None] * 4,
    },
    "idle_or_imbalance": {
        "all busy and balanced": [None, None],
        "a prefill idle for a minute while decode is busy": [IDLE_P0],
        "a prefill idle for half a minute": [None],
        "the other role has idle instances too": [None],
        "the only instance of its role is idle": [None],
        # d0 runs the fewest requests, so it drains fastest.
        "prefill queues back up while decode idles": [None, TO_PREFILL],
        "an imbalance too short to act on": [None, None],
        "an imbalance interrupted": [None, None, None],
        # After a proposal the imbalance must hold sustain_s again.
        "decode saturated while prefill has nothing queued": [None, TO_DECODE, None, TO_DECODE],
    },
}


def test_every_registered_policy_has_expectations() -> None:
    assert set(EXPECTED) == set(FLIP_POLICIES)
    for policy, table in EXPECTED.items():
        assert set(table) == set(SCENARIOS), policy


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("policy", sorted(FLIP_POLICIES))
def test_scenario_table(policy: str, scenario: str) -> None:
    clock = Clock()
    flipper = make_flip_policy(policy, clock)
    decisions = []
    for t, snapshot in SCENARIOS[scenario]:
        clock.t = t
        decisions.append(flipper.decide(snapshot))
    assert decisions == EXPECTED[policy][scenario]


@pytest.mark.parametrize("policy", sorted(FLIP_POLICIES))
@pytest.mark.parametrize("min_per_role", [1, 2])
def test_no_role_is_ever_left_without_instances(policy: str, min_per_role: int) -> None:
    # A random cluster of 2-6 instances, loads and signals changing every second, where
    # each proposal is carried out: the instance flips for a few seconds, then serves in
    # its new role.
    rng, clock = random.Random(min_per_role), Clock()
    config = FlipConfig(flip_idle_s=5, sustain_s=2, min_instances_per_role=min_per_role)
    flipper = make_flip_policy(policy, clock, config)
    n = 2 * min_per_role + rng.randint(1, 2)
    roles: dict[str, Role] = {f"i{k}": "prefill" if k < n // 2 else "decode"
                              for k in range(n)}
    flipping_until: dict[str, float] = {}
    num_flips = 0
    for second in range(3000):
        clock.t = float(second)
        for iid, until in list(flipping_until.items()):
            if until <= second:
                del flipping_until[iid]
        instances = [InstanceRole(iid, role, rng.choice([0, 0, 1, 4]),
                                  rng.choice([None, second - rng.randint(0, 20)]),
                                  iid in flipping_until) for iid, role in roles.items()]
        snapshot = ClusterSnapshot(instances, rng.choice([0.0, 0.05, 3.0]),
                                   rng.choice([0.1, 0.5, 0.95]))
        decision = flipper.decide(snapshot)
        if decision is not None:
            num_flips += 1
            assert roles[decision.instance_id] == decision.from_role != decision.to_role
            assert decision.instance_id not in flipping_until
            roles[decision.instance_id] = decision.to_role
            flipping_until[decision.instance_id] = second + rng.randint(1, 4)
        for role in ("prefill", "decode"):
            serving = [i for i, r in roles.items() if r == role and i not in flipping_until]
            assert len(serving) >= min_per_role, (second, role)
    if policy != "never":
        assert num_flips > 10  # the invariant was tested on real flips


def test_unknown_flip_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'always'.*idle, idle_or_imbalance, never"):
        make_flip_policy("always", Clock())
