"""Placement policies: which instance of a role gets the next request.

Pure: the request and a snapshot of candidate loads in, a `PlacementDecision` out; the
randomness is an injected `random.Random`. The global scheduler calls them for the prefill
leg and for the decode leg; a simulator can call the same objects. `shuffle` is the
paper's decode dispatcher and places decodes only (it needs a prediction).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.scheduler.policies.registry import lookup
from shuffleinfer.scheduler.prediction import Bound, Prediction


class PlacementConfig(BaseModel):
    """Parameters of the placement policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heavy_threshold_tokens: int = Field(default=128, ge=0, description=(
        "A decode is heavy when its predicted output (point estimate) is above this."))
    kv_bound: Bound = Field(default="lower", description=(
        "Which estimate of the predicted output sizes a request's KV need for the α filter "
        "(the paper's schedulers use the bucket's lower bound)."))


class InstanceView(NamedTuple):
    """What a placement policy may know about a candidate instance. A named tuple: as
    immutable as a frozen dataclass and three times cheaper to build, which the simulator
    does for every placement and monitor report."""

    instance_id: str
    num_running_reqs: int
    num_queued_prompt_tokens: int = 0
    num_free_kv_tokens: int | None = None
    """Free KV cache in tokens; None until the instance has reported it (the α filter
    then keeps the instance: no news is not a full cache)."""
    num_heavy_reqs: int = 0
    num_light_reqs: int = 0
    num_predicted_decode_tokens: int = 0
    """Predicted output tokens still to generate, summed over its running requests."""


class PlacementRequest(NamedTuple):
    """The request being placed."""

    req_id: str
    num_prompt_tokens: int
    prediction: Prediction | None = None
    """Predicted output length; None on the prefill leg (not predicted yet)."""


class PlacementDecision(NamedTuple):
    """Where the request goes."""

    instance_id: str
    fallback: Literal["alpha_empty", "no_prediction"] | None = None
    """Set when the policy could not apply its own rule, so the caller logs and counts it."""


def is_heavy(prediction: Prediction, config: PlacementConfig) -> bool:
    """Whether a decode with this prediction counts as heavy."""
    return prediction.point > config.heavy_threshold_tokens


load_key: Callable[[InstanceView], tuple[int, int, int, str]] = attrgetter(
    "num_queued_prompt_tokens", "num_running_reqs", "num_predicted_decode_tokens",
    "instance_id")
"""Lower is less loaded: queued prompt tokens, running requests, predicted decode tokens,
then the id (a full tie never depends on the candidates' order). An attrgetter: the
simulator calls it for every candidate of every placement."""


class PlacementPolicy(ABC):
    """Chooses one of the candidates; called once per request and leg."""

    decode_only: ClassVar[bool] = False
    """True when the policy needs a prediction, so it cannot place prefills."""

    def __init__(self, config: PlacementConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config or PlacementConfig()
        self.rng = rng or random.Random()

    @abstractmethod
    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        """Called with at least one candidate, in a stable order; returns one of them."""


class LeastLoad(PlacementPolicy):
    """The least loaded candidate by `load_key`."""

    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        return PlacementDecision(min(candidates, key=load_key).instance_id)


class RoundRobin(PlacementPolicy):
    """Each candidate in turn, whatever its load."""

    def __init__(self, config: PlacementConfig | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(config, rng)
        self._next = 0

    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return PlacementDecision(choice.instance_id)


class RandomPick(PlacementPolicy):
    """A uniformly random candidate."""

    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        return PlacementDecision(self.rng.choice(candidates).instance_id)


def two_choices(candidates: Sequence[InstanceView], rng: random.Random) -> list[InstanceView]:
    """Two distinct random candidates (the only one if there is one); O(1), however many
    candidates there are."""
    n = len(candidates)
    if n < 2:
        return list(candidates)
    # int(random() * n) rather than randrange(n): the same draw for any n a cluster has,
    # at a third of the cost (placement runs per request in the simulator).
    first, second = int(rng.random() * n), int(rng.random() * (n - 1))
    return [candidates[first], candidates[second + (second >= first)]]


_ALPHA_DRAWS = 8
"""Random draws `Shuffle` tries for its two members of α before it lists α whole."""


class PowerOfTwo(PlacementPolicy):
    """Two random candidates; the less loaded of them by `load_key`."""

    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        pair = two_choices(candidates, self.rng)
        return PlacementDecision(min(pair, key=load_key).instance_id)


class Shuffle(PlacementPolicy):
    """The paper's decode dispatcher. α = candidates whose free KV covers the request's
    predicted need (prompt + predicted output); two random members of α; a light decode
    goes to the one whose heavy:light ratio is lower once it is added (the paper's rule),
    a heavy decode to the one with fewer heavy decodes once it is added, then the lower
    ratio; full ties by `load_key`. An empty α falls back to the least loaded candidate,
    a missing prediction to power-of-two.

    Why heavy decodes count heavies first: by the ratio alone, a heavy decode goes to
    whichever instance has more light ones to dilute it, so heavy counts drift apart.
    Measured on the seeded stream of tests/scheduler/test_placement_hotspots.py (4
    instances, seeds 0-4, mean busiest / mean idlest instance's heavy decodes): with room
    for everything in α the ratio alone gives 1.9-2.0x, no better than random (1.9-2.1x);
    counting heavies first gives 1.24-1.29x, and 1.25-1.36x when KV is tight.
    """

    decode_only = True

    def place(self, request: PlacementRequest,
              candidates: Sequence[InstanceView]) -> PlacementDecision:
        prediction = request.prediction
        if prediction is None:
            pair = two_choices(candidates, self.rng)
            return PlacementDecision(min(pair, key=load_key).instance_id, "no_prediction")
        need = request.num_prompt_tokens + prediction.tokens(self.config.kv_bound)
        pair = self._two_of_alpha(candidates, need)
        if not pair:
            return PlacementDecision(min(candidates, key=load_key).instance_id, "alpha_empty")
        heavy = is_heavy(prediction, self.config)

        def mix_after(view: InstanceView) -> tuple[float, float, tuple[int, int, int, str]]:
            num_heavy = view.num_heavy_reqs + heavy
            num_light = view.num_light_reqs + (not heavy)
            ratio = num_heavy / num_light if num_light else math.inf
            return (num_heavy, ratio, load_key(view)) if heavy else \
                (ratio, num_heavy, load_key(view))

        return PlacementDecision(min(pair, key=mix_after).instance_id)

    def _two_of_alpha(self, candidates: Sequence[InstanceView],
                      need: int) -> list[InstanceView]:
        """Two distinct random members of α (fewer if α has fewer), uniformly. Drawn from
        the candidates and kept if they fit, which costs O(1) when most fit; only after
        `_ALPHA_DRAWS` draws without two is α listed (a full pass over the candidates)."""
        def fits(view: InstanceView) -> bool:
            return view.num_free_kv_tokens is None or view.num_free_kv_tokens >= need

        n = len(candidates)
        first: InstanceView | None = None
        for _ in range(_ALPHA_DRAWS if n > 2 else 0):
            view = candidates[int(self.rng.random() * n)]
            if not fits(view):
                continue
            if first is None:
                first = view
            elif view.instance_id != first.instance_id:
                return [first, view]
        return two_choices([c for c in candidates if fits(c)], self.rng)


PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    "least_load": LeastLoad,
    "round_robin": RoundRobin,
    "random": RandomPick,
    "power_of_two": PowerOfTwo,
    "shuffle": Shuffle,
}

PREFILL_PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    name: cls for name, cls in PLACEMENT_POLICIES.items() if not cls.decode_only}


def make_placement_policy(name: str, config: PlacementConfig | None = None,
                          rng: random.Random | None = None) -> PlacementPolicy:
    """Build a policy by name; an unknown name raises ValueError listing the known ones."""
    return lookup(PLACEMENT_POLICIES, name, "placement policy")(config, rng)
