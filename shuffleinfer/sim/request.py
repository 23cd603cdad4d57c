"""One request's life in the simulator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.records import TraceRequest
from shuffleinfer.scheduler.policies.admission import WaitingDecode
from shuffleinfer.scheduler.prediction import Prediction


@dataclass(eq=False, slots=True)
class SimRequest:
    """One request's life in the simulator (times in simulated seconds)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prediction: Prediction | None = None
    prefill_id: str | None = None
    decode_id: str | None = None
    prefill_started_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    join_step: int = 0
    handover_s: float = 0.0
    _waiting: WaitingDecode | None = None

    def waiting_view(self) -> WaitingDecode:
        """What the admission policy sees of it while it waits (built once)."""
        if self._waiting is None:
            self._waiting = WaitingDecode(str(self.index), self.prompt_tokens + 1,
                                          self.prediction or Prediction(0, 0, 0, 0),
                                          num_output_tokens=0)
        return self._waiting


def sim_requests(requests: Sequence[TraceRequest]) -> list[SimRequest]:
    """A `SimRequest` for each of `requests`, in order (lengths at least 1)."""
    return [SimRequest(i, r.arrival_s, max(r.prompt_tokens, 1), max(r.output_tokens, 1))
            for i, r in enumerate(requests)]
