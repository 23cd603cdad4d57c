"""A prefill instance's own queue: prompts wait here in the order policy's order, and the
engine is fed only what fills its next chunk.

Why a queue outside vLLM: vLLM runs what it holds first come, first served, so a prompt
handed to it early can no longer be overtaken. Here the engine holds about one chunk of
prompt work beyond the step it is running, and every other prompt waits in this queue,
where `PrefillOrderPolicy.order` (fcfs, sjf, ljf in windows) decides which goes next.

A prompt's life here:
1. `admitted(req_id, num_tokens)` queues it and waits until `_pump` lets it through;
2. the caller then hands it to the engine; its tokens count as work the engine has not
   run yet (`unrun_tokens`), less `chunk_size` at every engine step (`on_step`);
3. leaving the `admitted` block (prefill done, failed or cancelled) takes it off the
   books; a prompt cancelled while still queued simply leaves the queue, and one aborted
   while still queued (`abort`) leaves it with `AbortedWhileWaiting`: an abandoned prompt
   costs the engine nothing.
`_pump` admits in policy order while the engine's unrun work is below one chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from shuffleinfer.scheduler.policies.prefill_order import PrefillOrderPolicy, QueuedPrompt

_RECENT_DELAYS = 32
"""Queueing delays remembered for the reported average (the most recent prompts)."""


class AbortedWhileWaiting(Exception):
    """Raised by `admitted` when the request was aborted before its turn came: it never
    reached the engine."""


class _HasAdmitted(Protocol):
    admitted: asyncio.Future[None]


_W = TypeVar("_W", bound=_HasAdmitted)


def abort_waiting(waiting: dict[str, _W], req_id: str) -> bool:
    """Take `req_id` out of `waiting`, failing its wait with `AbortedWhileWaiting`; False
    if it was not there. (Shared by this queue and the decode gate.)"""
    waiter = waiting.pop(req_id, None)
    if waiter is None:
        return False
    if not waiter.admitted.done():
        waiter.admitted.set_exception(AbortedWhileWaiting(req_id))
    return True


@dataclass
class _Waiter:
    prompt: QueuedPrompt
    queued_at: float
    admitted: asyncio.Future[None]


class PrefillQueue:
    """Policy-ordered admission of prompts into one engine."""

    def __init__(self, policy: PrefillOrderPolicy, chunk_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.policy = policy
        self.chunk_size = chunk_size
        self._clock = clock
        self._waiting: dict[str, _Waiter] = {}
        self._in_engine: dict[str, int] = {}
        """Prompt tokens of each admitted prompt whose prefill has not finished."""
        self._unrun = 0
        self._next_seq = 0
        self._delays: deque[float] = deque(maxlen=_RECENT_DELAYS)

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens waiting here plus those admitted and not finished."""
        return (sum(w.prompt.num_prompt_tokens for w in self._waiting.values())
                + sum(self._in_engine.values()))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def unrun_tokens(self) -> int:
        """Estimated prompt tokens the engine holds and has not run yet."""
        return self._unrun

    @property
    def recent_delay_s(self) -> float:
        """Mean queueing delay of the most recently admitted prompts (0 before any)."""
        return sum(self._delays) / len(self._delays) if self._delays else 0.0

    def oldest_wait_s(self) -> float:
        """How long the longest-waiting prompt has waited so far (0 when none waits)."""
        if not self._waiting:
            return 0.0
        return self._clock() - min(w.queued_at for w in self._waiting.values())

    @asynccontextmanager
    async def admitted(self, req_id: str, num_tokens: int) -> AsyncIterator[None]:
        """Wait for the prompt's turn; the body runs it on the engine."""
        if req_id in self._waiting or req_id in self._in_engine:
            raise ValueError(f"request {req_id} is already in the prefill queue")
        waiter = _Waiter(QueuedPrompt(req_id, self._next_seq, max(num_tokens, 1)),
                         self._clock(), asyncio.get_running_loop().create_future())
        self._next_seq += 1
        self._waiting[req_id] = waiter
        self._pump()
        try:
            await waiter.admitted
        except BaseException:
            if self._waiting.pop(req_id, None) is None:  # admitted as it was cancelled
                self._done(req_id)
            self._pump()
            raise
        try:
            yield
        finally:
            self._done(req_id)
            self._pump()

    def abort(self, req_id: str) -> bool:
        """Take a prompt that is still waiting off the queue (its `admitted` raises
        `AbortedWhileWaiting`); False if it is not waiting (in the engine, or unknown)."""
        if not abort_waiting(self._waiting, req_id):
            return False
        self._pump()
        return True

    def on_step(self) -> None:
        """Called after every engine step: a step runs up to one chunk of prompt work."""
        self._unrun = max(0, self._unrun - self.chunk_size)
        self._pump()

    def _done(self, req_id: str) -> None:
        self._in_engine.pop(req_id, None)
        self._unrun = min(self._unrun, sum(self._in_engine.values()))

    def _pump(self) -> None:
        if not self._waiting or self._unrun >= self.chunk_size:
            return
        ordered = self.policy.order([w.prompt for w in self._waiting.values()])
        now = self._clock()
        for prompt in ordered:
            if self._unrun >= self.chunk_size:
                break
            waiter = self._waiting.pop(prompt.req_id)
            if waiter.admitted.done():  # cancelled; its task has not run its cleanup yet
                continue
            self._in_engine[prompt.req_id] = prompt.num_prompt_tokens
            self._unrun += prompt.num_prompt_tokens
            self._delays.append(now - waiter.queued_at)
            waiter.admitted.set_result(None)
