"""Flip: when an instance should change role (prefill <-> decode).

The policy only proposes; the runtime executes a proposal (stop taking work, drain, change
role, no engine restart) and marks the instance `flipping` meanwhile. Called at every
monitor interval. Two reasons to flip:
- idle: an instance has had no work for `flip_idle_s` while every instance of the other
  role is busy;
- imbalance: prefill queueing delay above a threshold while decode utilisation is below
  another (or the reverse), held for `sustain_s`; the least loaded instance of the role
  with spare capacity moves. After a proposal the imbalance must hold `sustain_s` again.
No proposal ever leaves a role with fewer than `min_instances_per_role` instances that are
not flipping (an instance flipping into a role does not count for it yet).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.scheduler.policies.registry import lookup

Role = Literal["prefill", "decode"]
OTHER: dict[Role, Role] = {"prefill": "decode", "decode": "prefill"}


class FlipConfig(BaseModel):
    """Parameters of instance flips."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip_idle_s: float = Field(default=60.0, gt=0, description=(
        "An instance idle this long flips to the other role if that role is all busy."))
    sustain_s: float = Field(default=10.0, ge=0, description=(
        "How long an imbalance must hold before it causes a flip."))
    prefill_delay_high_s: float = Field(default=2.0, gt=0, description=(
        "Prefill queueing delay above which prefill is short of instances."))
    prefill_delay_low_s: float = Field(default=0.1, ge=0, description=(
        "Prefill queueing delay below which prefill can spare an instance."))
    decode_utilisation_low: float = Field(default=0.3, ge=0, le=1, description=(
        "Decode utilisation (0-1) below which decode can spare an instance."))
    decode_utilisation_high: float = Field(default=0.9, ge=0, le=1, description=(
        "Decode utilisation (0-1) above which decode is short of instances."))
    min_instances_per_role: int = Field(default=1, ge=1, description=(
        "A flip never leaves a role with fewer instances than this."))


@dataclass(frozen=True)
class InstanceRole:
    """One instance as the flip policy sees it."""

    instance_id: str
    role: Role
    num_running_reqs: int
    idle_since_at: float | None
    """When it last ran out of work (clock of `now`); None while it has work."""
    flipping: bool = False


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster monitor's latest view."""

    instances: Sequence[InstanceRole]
    prefill_queue_delay_s: float
    """How long prompts recently waited in prefill queues."""
    decode_utilisation: float
    """Fraction of decode capacity (KV cache) in use, 0-1."""


@dataclass(frozen=True)
class FlipDecision:
    """Proposal: `instance_id` drains and changes from `from_role` to `to_role`."""

    instance_id: str
    from_role: Role
    to_role: Role
    reason: Literal["idle", "imbalance"]


class FlipPolicy(ABC):
    """Proposes at most one role change per call."""

    def __init__(self, now: Callable[[], float], config: FlipConfig | None = None) -> None:
        self.now = now
        self.config = config or FlipConfig()

    @abstractmethod
    def decide(self, snapshot: ClusterSnapshot) -> FlipDecision | None:
        """Called at every monitor interval; returns a proposal or None."""

    def movable(self, snapshot: ClusterSnapshot, role: Role) -> list[InstanceRole]:
        """Instances of `role` that may leave it without going under the minimum."""
        settled = [i for i in snapshot.instances if i.role == role and not i.flipping]
        return settled if len(settled) > self.config.min_instances_per_role else []


class NeverFlip(FlipPolicy):
    """Roles stay as started."""

    def decide(self, snapshot: ClusterSnapshot) -> FlipDecision | None:
        return None


class IdleFlip(FlipPolicy):
    """Flips an instance idle for `flip_idle_s` into a role whose instances are all busy."""

    def decide(self, snapshot: ClusterSnapshot) -> FlipDecision | None:
        now, idle_s = self.now(), self.config.flip_idle_s
        candidates: list[InstanceRole] = []
        for role in ("prefill", "decode"):
            others = [i for i in snapshot.instances if i.role == OTHER[role] and not i.flipping]
            if others and all(i.idle_since_at is None for i in others):
                candidates += [i for i in self.movable(snapshot, role)
                               if i.idle_since_at is not None and now - i.idle_since_at >= idle_s]
        if not candidates:
            return None
        longest = min(candidates, key=lambda i: (i.idle_since_at, i.instance_id))
        return FlipDecision(longest.instance_id, longest.role, OTHER[longest.role], "idle")


class IdleOrImbalanceFlip(IdleFlip):
    """The idle rule, else a sustained imbalance between prefill queueing delay and decode
    utilisation."""

    def __init__(self, now: Callable[[], float], config: FlipConfig | None = None) -> None:
        super().__init__(now, config)
        self._imbalance: tuple[Role, float] | None = None  # (role short of instances, since)

    def short_role(self, snapshot: ClusterSnapshot) -> Role | None:
        """The role short of instances by the thresholds, if any."""
        c, delay, util = self.config, snapshot.prefill_queue_delay_s, snapshot.decode_utilisation
        if delay > c.prefill_delay_high_s and util < c.decode_utilisation_low:
            return "prefill"
        if util > c.decode_utilisation_high and delay < c.prefill_delay_low_s:
            return "decode"
        return None

    def decide(self, snapshot: ClusterSnapshot) -> FlipDecision | None:
        if (idle := super().decide(snapshot)) is not None:
            return idle
        now, short = self.now(), self.short_role(snapshot)
        if short is None:
            self._imbalance = None
            return None
        if self._imbalance is None or self._imbalance[0] != short:
            self._imbalance = (short, now)
        if now - self._imbalance[1] < self.config.sustain_s:
            return None
        spare = self.movable(snapshot, OTHER[short])
        if not spare:
            return None
        self._imbalance = (short, now)
        least = min(spare, key=lambda i: (i.num_running_reqs, i.instance_id))
        return FlipDecision(least.instance_id, least.role, short, "imbalance")


FLIP_POLICIES: dict[str, type[FlipPolicy]] = {
    "never": NeverFlip,
    "idle": IdleFlip,
    "idle_or_imbalance": IdleOrImbalanceFlip,
}


def make_flip_policy(name: str, now: Callable[[], float],
                     config: FlipConfig | None = None) -> FlipPolicy:
    """Build a flip policy by name; an unknown name raises ValueError listing the known."""
    return lookup(FLIP_POLICIES, name, "flip policy")(now, config)
