"""Decode admission: which waiting decodes a decode instance starts now.

Every policy walks the waiting queue in order and stops at the first request it cannot
admit, so a large request is never overtaken forever by small ones. A request must always
fit now at its current size (prompt plus tokens generated so far); the policies differ in
what they reserve for its growth:
- greedy: nothing (the engine preempts when the cache runs out);
- reserve_static: its predicted final KV (prompt + predicted output) fits in free KV now;
- reserve_dynamic: its predicted final KV fits once the running request with the least
  predicted remaining work finishes and frees its KV.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.scheduler.policies.registry import lookup
from shuffleinfer.scheduler.prediction import Bound, Prediction


class AdmissionConfig(BaseModel):
    """Parameters of decode admission."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_bound: Bound = Field(default="lower", description=(
        "Which estimate of the predicted output the reserve policies reserve KV for "
        "(the paper: the bucket's lower bound)."))


@dataclass(frozen=True)
class WaitingDecode:
    """A request whose KV was handed over, waiting to start decoding."""

    req_id: str
    num_prompt_tokens: int
    prediction: Prediction
    num_output_tokens: int = 1
    """Tokens generated so far (the prefill instance's first token)."""

    @property
    def num_kv_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass(frozen=True)
class RunningDecode:
    """A request decoding on this instance."""

    req_id: str
    num_kv_tokens: int
    num_predicted_remaining_tokens: int


@dataclass(frozen=True)
class AdmissionSnapshot:
    """The decode instance's queue and cache, as of its last engine step."""

    waiting: Sequence[WaitingDecode]
    """In queue order (arrival)."""
    running: Sequence[RunningDecode]
    num_free_kv_tokens: int


@dataclass(frozen=True)
class AdmissionDecision:
    """The waiting requests to start now, in queue order."""

    admit: tuple[str, ...]


class AdmissionPolicy(ABC):
    """Chooses which waiting decodes to admit; `schedule` is called before each engine step
    that has waiting requests."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config or AdmissionConfig()

    @abstractmethod
    def reserve(self, req: WaitingDecode) -> int:
        """KV tokens to reserve for `req` against `budget`."""

    def budget(self, snapshot: AdmissionSnapshot) -> int:
        """KV tokens the reservations of one call may use together."""
        return snapshot.num_free_kv_tokens

    def predicted_kv_tokens(self, req: WaitingDecode) -> int:
        """KV the request holds when it finishes, by the configured estimate."""
        output = max(req.prediction.tokens(self.config.kv_bound), req.num_output_tokens)
        return req.num_prompt_tokens + output

    def schedule(self, snapshot: AdmissionSnapshot) -> AdmissionDecision:
        """Walk the waiting queue; admit while the request fits now and its reservation
        fits the budget."""
        free_now, budget = snapshot.num_free_kv_tokens, self.budget(snapshot)
        admitted: list[str] = []
        for req in snapshot.waiting:
            reserve = self.reserve(req)
            if req.num_kv_tokens > free_now or reserve > budget:
                break
            admitted.append(req.req_id)
            free_now -= req.num_kv_tokens
            budget -= reserve
        return AdmissionDecision(tuple(admitted))


class Greedy(AdmissionPolicy):
    """Admit while the request fits now at its current size."""

    def reserve(self, req: WaitingDecode) -> int:
        return req.num_kv_tokens


class ReserveStatic(AdmissionPolicy):
    """Admit while the predicted final KV fits in free KV now."""

    def reserve(self, req: WaitingDecode) -> int:
        return self.predicted_kv_tokens(req)


class ReserveDynamic(ReserveStatic):
    """Admit while the predicted final KV fits in free KV plus the KV of the running
    request expected to finish first (it grows to its end, then frees all it holds)."""

    def budget(self, snapshot: AdmissionSnapshot) -> int:
        if not snapshot.running:
            return snapshot.num_free_kv_tokens
        first = min(snapshot.running,
                    key=lambda r: (r.num_predicted_remaining_tokens, -r.num_kv_tokens))
        return snapshot.num_free_kv_tokens + first.num_kv_tokens


ADMISSION_POLICIES: dict[str, type[AdmissionPolicy]] = {
    "greedy": Greedy,
    "reserve_static": ReserveStatic,
    "reserve_dynamic": ReserveDynamic,
}


def make_admission_policy(name: str, config: AdmissionConfig | None = None) -> AdmissionPolicy:
    """Build an admission policy by name; an unknown name raises ValueError listing the
    known ones."""
    return lookup(ADMISSION_POLICIES, name, "admission policy")(config)
