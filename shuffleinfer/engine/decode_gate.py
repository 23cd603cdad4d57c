"""A decode instance's admission: decodes wait here until the admission policy starts them.

The policy (greedy, reserve_static, reserve_dynamic; see
`shuffleinfer.scheduler.policies.admission`) sees the waiting decodes in arrival order, the
running ones with their predicted remaining work, and the free KV cache. Free KV is the
smaller of two views: the engine's own usage as of its last step (it lags admissions) and
this gate's bookkeeping of what its running decodes hold, in whole blocks (it knows
nothing of other users of the cache, such as prefill leases). An instance with nothing
running always admits its first waiting decode, so an estimate can delay a request but
never strand it.

A decode's life here: `admitted(...)` waits for its turn and yields a `RunningDecode`-like
handle whose `num_generated` the caller advances as tokens arrive; leaving the block frees
its place and lets the next ones in.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from shuffleinfer.engine.prefill_queue import abort_waiting
from shuffleinfer.scheduler.policies.admission import (
    AdmissionPolicy,
    AdmissionSnapshot,
    RunningDecode,
    WaitingDecode,
)
from shuffleinfer.scheduler.prediction import Prediction


@dataclass
class DecodeSlot:
    """A decode admitted to the engine; the caller counts its tokens."""

    req_id: str
    num_prompt_tokens: int
    prediction: Prediction | None
    num_generated: int = 0

    @property
    def num_kv_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    @property
    def num_predicted_remaining(self) -> int:
        point = self.prediction.point if self.prediction else 0
        return max(point - self.num_generated, 0)


@dataclass
class _Waiter:
    decode: WaitingDecode
    slot: DecodeSlot
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class DecodeGate:
    """Admission of decodes into one engine, by an `AdmissionPolicy`."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.capacity_tokens: int | None = None
        """The engine's KV cache in tokens; None until the engine is up (admit all)."""
        self.block_size = 16
        self._engine_usage = 0.0
        self._waiting: dict[str, _Waiter] = {}
        self.running: dict[str, DecodeSlot] = {}

    def set_capacity(self, num_blocks: int, block_size: int) -> None:
        """Called once the engine knows its KV cache size."""
        self.block_size = max(block_size, 1)
        self.capacity_tokens = num_blocks * self.block_size

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def free_kv_tokens(self) -> int | None:
        """Free KV tokens by the more cautious of the engine's and this gate's views."""
        if self.capacity_tokens is None:
            return None
        held = sum(math.ceil(s.num_kv_tokens / self.block_size) * self.block_size
                   for s in self.running.values())
        by_engine = int(self.capacity_tokens * (1.0 - self._engine_usage))
        return max(min(self.capacity_tokens - held, by_engine), 0)

    @asynccontextmanager
    async def admitted(self, req_id: str, num_prompt_tokens: int,
                       prediction: Prediction | None) -> AsyncIterator[DecodeSlot]:
        """Wait until the policy admits the decode; the body runs it on the engine.
        `num_prompt_tokens` counts what the engine must hold at the start (the prompt
        plus the prefill's first token)."""
        if req_id in self._waiting or req_id in self.running:
            raise ValueError(f"request {req_id} is already waiting or decoding here")
        # Unpredicted decodes reserve nothing beyond their current size (as greedy would).
        waiting = WaitingDecode(req_id, num_prompt_tokens, prediction or Prediction(0, 0, 0, 0),
                                num_output_tokens=0)
        waiter = _Waiter(waiting, DecodeSlot(req_id, num_prompt_tokens, prediction))
        self._waiting[req_id] = waiter
        self._pump()
        try:
            await waiter.admitted
        except BaseException:
            self._waiting.pop(req_id, None)
            self.running.pop(req_id, None)  # admitted as it was cancelled
            self._pump()
            raise
        try:
            yield waiter.slot
        finally:
            self.running.pop(req_id, None)
            self._pump()

    def abort(self, req_id: str) -> bool:
        """Take a decode that is still waiting out of the gate (its `admitted` raises
        `AbortedWhileWaiting`); False if it is not waiting (admitted, or unknown)."""
        if not abort_waiting(self._waiting, req_id):
            return False
        self._pump()
        return True

    def on_step(self, kv_cache_usage: float) -> None:
        """Called after every engine step with the engine's KV usage (0-1)."""
        self._engine_usage = min(max(kv_cache_usage, 0.0), 1.0)
        self._pump()

    def _pump(self) -> None:
        if not self._waiting:
            return
        free = self.free_kv_tokens()
        waiting = [w.decode for w in self._waiting.values()]
        if free is None:
            admit = [w.req_id for w in waiting]
        else:
            running = [RunningDecode(s.req_id, s.num_kv_tokens, s.num_predicted_remaining)
                       for s in self.running.values()]
            admit = list(self.policy.schedule(AdmissionSnapshot(waiting, running, free)).admit)
            if not admit and not self.running:
                admit = [waiting[0].req_id]  # an idle engine never waits for an estimate
        for req_id in admit:
            waiter = self._waiting.pop(req_id)
            if not waiter.admitted.done():
                # Counted as running at once, so the next _pump sees its KV as taken.
                self.running[req_id] = waiter.slot
                waiter.admitted.set_result(None)
