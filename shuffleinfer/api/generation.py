"""Driving one request's backend stream, for streamed and non-streamed responses alike.

A request's life cycle here:

1. `Generation.first_delta()` calls `backend.generate` and waits for the first token. A
   failure now is still an HTTP error status (503 when the backend is overloaded, else 500)
   because no response byte has been sent.
2. `Generation.deltas()` yields that first delta and then the rest, feeding the metrics.
   A delta finishing with "error" or "abort", an exception, or a stream that ends without
   a finish reason, becomes an `APIError`.
3. `Generation.close()` closes the backend iterator, which aborts the request on every
   instance that still holds it. It runs in a `finally` on every path: normal end, error,
   client disconnect (cancellation) and server shutdown. Closing a finished iterator is
   a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from shuffleinfer.api.errors import APIError
from shuffleinfer.api.metrics import RequestMetrics
from shuffleinfer.protocol import (
    Backend,
    BackendUnavailableError,
    GenerateRequest,
    TokenDelta,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLOSE_TIMEOUT_S = 30.0
"""How long closing a backend iterator (aborting the request) may take before we give up."""


class Generation:
    """One request's stream of deltas from the backend."""

    def __init__(self, backend: Backend, request: GenerateRequest, metrics: RequestMetrics):
        self.request = request
        self.num_generated_tokens = 0
        self.finished = False
        """True once a delta with a normal finish reason ("stop"/"length") arrived."""
        self._backend = backend
        self._metrics = metrics
        self._iterator: AsyncIterator[TokenDelta] | None = None
        self._first: TokenDelta | None = None

    async def first_delta(self) -> TokenDelta:
        """Start the request and wait for its first delta (the prefill's first token)."""
        try:
            with self._backend_errors():
                self._iterator = self._backend.generate(self.request)
            first = await self._next()
            if first is None:
                raise APIError(500, "The backend ended the stream without any output.")
        except BaseException:
            await self.close()
            raise
        self._first = first
        return first

    async def deltas(self) -> AsyncGenerator[TokenDelta, None]:
        """Every delta of the request, the first included; raises `APIError` on failure."""
        if self._first is None:
            await self.first_delta()
        assert self._first is not None and self._iterator is not None  # set by first_delta
        delta: TokenDelta | None = self._first
        while delta is not None:
            if self.finished:
                logger.warning("request %s: backend yielded a delta after the finish; "
                               "ignored", self.request.req_id)
            else:
                self._check(delta)
                self._metrics.on_delta(delta)
                self.num_generated_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    self.finished = True
                    self._metrics.on_finish()
                yield delta
            delta = await self._next()
        if not self.finished:
            logger.error("request %s: backend stream ended without a finish reason",
                         self.request.req_id)
            raise APIError(500, "The backend ended the stream without finishing the request.")

    def _check(self, delta: TokenDelta) -> None:
        """Turn a delta that reports a failure into an `APIError`."""
        if delta.finish_reason == "error":
            raise APIError(500, "The backend failed while generating this request.")
        if delta.finish_reason == "abort":
            raise APIError(503, "The server aborted this request; please retry.")

    async def _next(self) -> TokenDelta | None:
        """The next delta, or None at the end."""
        assert self._iterator is not None  # set by first_delta
        with self._backend_errors():
            try:
                return await anext(self._iterator)
            except StopAsyncIteration:
                return None

    @contextmanager
    def _backend_errors(self) -> Iterator[None]:
        """Turn backend exceptions into `APIError`s: 503 when overloaded, else 500.

        Cancellation is not an Exception, so it passes through untouched.
        """
        try:
            yield
        except BackendUnavailableError as e:
            raise APIError(503, f"The server cannot take this request now: {e}") from e
        except APIError:
            raise
        except Exception as e:
            logger.exception("request %s: backend failed", self.request.req_id)
            raise APIError(500, f"Generation failed: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        """Close the backend iterator (aborting the request if unfinished); idempotent.

        Shielded, so it completes even while the surrounding task is being cancelled.
        """
        iterator, self._iterator = self._iterator, None
        aclose = getattr(iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
            try:
                await aclose()
            except Exception:
                logger.exception("request %s: closing the backend stream failed",
                                 self.request.req_id)
        if scope.cancelled_caught:
            logger.error("request %s: closing the backend stream timed out after %.0f s",
                         self.request.req_id, CLOSE_TIMEOUT_S)


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away (the request body must be read already)."""
    while True:
        try:
            message = await request.receive()
        except Exception:  # a broken connection is a gone client
            logger.debug("receive() failed; treating it as a disconnect", exc_info=True)
            return
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client disconnects first, cancel it and return None.

    ASGI servers do not cancel a handler whose client left, so without this a
    non-streamed request would keep its instances busy until it finished.
    """
    work_task: asyncio.Task[Any] = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            # Let the work's `finally` (closing the backend stream) run to its end.
            with anyio.CancelScope(shield=True):
                await asyncio.wait({work_task})
    if work_task.cancelled():
        return None
    return work_task.result()
