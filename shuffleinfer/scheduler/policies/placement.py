"""Placement policies: which instance of a role gets the next request.

Pure: a snapshot of candidate loads in, an instance id out. The global scheduler calls
them for the prefill and for the decode placement; a simulator can call the same objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceView:
    """What a placement policy may know about a candidate instance."""

    instance_id: str
    num_running_reqs: int
    num_queued_prompt_tokens: int


class PlacementPolicy(ABC):
    """Chooses one of the candidates; called once per request and leg."""

    @abstractmethod
    def place(self, candidates: Sequence[InstanceView]) -> str:
        """Called with at least one candidate, in a stable order; returns its instance_id."""


class LeastLoad(PlacementPolicy):
    """Fewest queued prompt tokens, then fewest running requests, then lowest id."""

    def place(self, candidates: Sequence[InstanceView]) -> str:
        best = min(candidates, key=lambda c: (c.num_queued_prompt_tokens,
                                              c.num_running_reqs, c.instance_id))
        return best.instance_id


class RoundRobin(PlacementPolicy):
    """Each candidate in turn, whatever its load."""

    def __init__(self) -> None:
        self._next = 0

    def place(self, candidates: Sequence[InstanceView]) -> str:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice.instance_id


PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    "least_load": LeastLoad,
    "round_robin": RoundRobin,
}


def make_placement_policy(name: str) -> PlacementPolicy:
    """Build a policy by name; an unknown name raises ValueError listing the known ones."""
    try:
        return PLACEMENT_POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(PLACEMENT_POLICIES))
        raise ValueError(f"unknown placement policy {name!r}; known: {known}") from None
