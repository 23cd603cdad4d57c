"""Which role each instance plays and whether it takes work: the scheduler's roster.

An instance's life in the roster:
  active (gets work of its role) -> draining (admin: no new work, what it holds finishes)
  -> active again (resume);
  active -> flipping (admin or the flip policy: no new work) -> once it holds nothing,
  its role changes and it is active again. No engine restarts: every engine can play
  either role.
A role never loses its last active instance to a drain or a flip (the flip policy obeys
its own `min_instances_per_role` on top). Ray-free and clock-injected, like the policies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shuffleinfer.protocol import InstanceLoad, InstanceState, RoleChangeError, UnknownInstanceError
from shuffleinfer.scheduler.policies.flip import (
    OTHER,
    ClusterSnapshot,
    FlipDecision,
    FlipPolicy,
    InstanceRole,
    Role,
)

logger = logging.getLogger(__name__)


@dataclass
class _Member:
    role: Role
    state: InstanceState = "active"
    flip_to: Role | None = None
    idle_since: float | None = None


@dataclass(frozen=True)
class RoleChange:
    """A finished flip: the runtime tells the instance."""

    instance_id: str
    role: Role
    reason: str


class Roster:
    """Roles and states of the cluster's instances."""

    def __init__(self, prefill_ids: Iterable[str], decode_ids: Iterable[str],
                 flip_policy: FlipPolicy, clock: Callable[[], float]) -> None:
        self._members = {i: _Member("prefill") for i in prefill_ids}
        self._members |= {i: _Member("decode") for i in decode_ids}
        self.flip_policy = flip_policy
        self._clock = clock
        self.num_flips = 0
        """Role changes completed since the start."""

    def ids(self) -> list[str]:
        return list(self._members)

    def role(self, instance_id: str) -> Role:
        return self._member(instance_id).role

    def state(self, instance_id: str) -> InstanceState:
        return self._member(instance_id).state

    def flipping(self) -> bool:
        """Whether any instance is flipping now."""
        return any(m.state == "flipping" for m in self._members.values())

    def active(self, role: Role) -> list[str]:
        """Instances that get new work of `role`."""
        return [i for i, m in self._members.items() if m.role == role and m.state == "active"]

    def _member(self, instance_id: str) -> _Member:
        try:
            return self._members[instance_id]
        except KeyError:
            known = ", ".join(self._members)
            raise UnknownInstanceError(f"no instance {instance_id!r}; known: {known}") from None

    def _check_not_last(self, instance_id: str, action: str) -> None:
        role = self._member(instance_id).role
        if self.active(role) == [instance_id]:
            raise RoleChangeError(f"cannot {action} {instance_id}: it is the last {role} "
                                  f"instance taking work")

    def drain(self, instance_id: str) -> InstanceState:
        member = self._member(instance_id)
        if member.state == "flipping":
            raise RoleChangeError(f"{instance_id} is flipping to {member.flip_to}")
        if member.state == "active":
            self._check_not_last(instance_id, "drain")
            member.state = "draining"
            logger.warning("%s drains (no new work)", instance_id)
        return member.state

    def resume(self, instance_id: str) -> InstanceState:
        member = self._member(instance_id)
        if member.state == "flipping":
            raise RoleChangeError(f"{instance_id} is flipping to {member.flip_to}; it "
                                  f"takes work once the flip is done")
        member.state = "active"
        return member.state

    def begin_flip(self, instance_id: str, to_role: Role | None = None) -> InstanceState:
        member = self._member(instance_id)
        target = to_role or OTHER[member.role]
        if member.state == "flipping":
            raise RoleChangeError(f"{instance_id} is already flipping to {member.flip_to}")
        if target == member.role:
            raise RoleChangeError(f"{instance_id} is already a {target} instance")
        if member.state == "active":
            self._check_not_last(instance_id, f"flip {member.role} instance")
        member.state, member.flip_to = "flipping", target
        logger.warning("%s flips %s -> %s: draining", instance_id, member.role, target)
        return member.state

    def on_monitor(self, loads: dict[str, InstanceLoad], held: dict[str, int]
                   ) -> list[RoleChange]:
        """Called at every monitor interval with the instances' reports and the requests
        the scheduler's table holds on each: finish flips of drained instances, track
        idleness, and let the flip policy propose one more flip."""
        now = self._clock()
        changes = []
        for instance_id, member in self._members.items():
            load = loads.get(instance_id)
            busy = held.get(instance_id, 0) > 0 or (
                load is not None and (load.num_running_reqs > 0 or load.num_waiting_reqs > 0))
            if busy:
                member.idle_since = None
            elif member.idle_since is None:
                member.idle_since = now
            if member.state == "flipping" and not busy and load is not None:
                assert member.flip_to is not None  # set with the state
                changes.append(RoleChange(instance_id, member.flip_to, "drained"))
                member.role, member.state, member.flip_to = member.flip_to, "active", None
                member.idle_since = now  # a fresh start in the new role
                self.num_flips += 1
                logger.warning("%s is now a %s instance", instance_id, member.role)
        decision = self.flip_policy.decide(self._snapshot(loads, held))
        if decision is not None:
            self._propose(decision)
        return changes

    def _propose(self, decision: FlipDecision) -> None:
        try:
            self.begin_flip(decision.instance_id, decision.to_role)
            logger.warning("flip policy: %s -> %s (%s)", decision.instance_id,
                           decision.to_role, decision.reason)
        except RoleChangeError as e:
            logger.info("flip policy proposal refused: %s", e)

    def _snapshot(self, loads: dict[str, InstanceLoad], held: dict[str, int]
                  ) -> ClusterSnapshot:
        members = [InstanceRole(i, m.role, held.get(i, 0), m.idle_since,
                                flipping=m.state != "active")
                   for i, m in self._members.items()]
        prefill = [loads[i] for i in self.active("prefill") if i in loads]
        decode = [loads[i] for i in self.active("decode") if i in loads]
        delay = max((x.prefill_queue_delay_s for x in prefill), default=0.0)
        usage = sum(x.kv_cache_usage for x in decode) / len(decode) if decode else 0.0
        return ClusterSnapshot(members, delay, usage)
