"""Server-sent events: OpenAI's `data: {...}\\n\\n` chunks ending with `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from shuffleinfer.api.errors import APIError
from shuffleinfer.api.generation import Generation
from shuffleinfer.api.serialization import Formatter

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(data: dict[str, Any]) -> bytes:
    """One SSE event holding `data` as compact JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + \
        b"\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that always runs its clean-up, however the stream ends.

    Starlette leaves the event iterator suspended when the client goes away, or never
    starts it, so clean-up placed in the iterator would wait for the garbage collector.
    `on_close` (closing the backend stream, counting the request) runs before the
    response ends instead, shielded from the cancellation that ended the stream.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        """Send the events; then close the iterator and run `on_close`, whatever happened."""
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


class EventStream:
    """The SSE events of one request, and how the stream ended."""

    def __init__(self, generation: Generation, formatter: Formatter, *,
                 num_prompt_tokens: int) -> None:
        self.generation = generation
        self.formatter = formatter
        self.num_prompt_tokens = num_prompt_tokens
        self.status: int | str = "aborted"
        """200; the error's status code when the backend failed mid-stream (sent as an
        `{"error": ...}` event before `[DONE]`); "aborted" when the client went away."""

    async def events(self) -> AsyncIterator[bytes]:
        """Chunks for every delta, the usage chunk if asked for, then `[DONE]`."""
        formatter = self.formatter
        try:
            async with aclosing(self.generation.deltas()) as deltas:
                async for delta in deltas:
                    for chunk in formatter.chunks(delta):
                        yield sse_event(chunk)
            if formatter.include_usage:
                yield sse_event(formatter.usage_chunk(self.num_prompt_tokens,
                                                      self.generation.num_generated_tokens))
            status: int | str = 200
        except APIError as e:
            yield sse_event(e.body())
            status = e.status_code
        yield SSE_DONE
        self.status = status
