"""A fake OpenAI-compatible server for the harness tests: FastAPI + uvicorn on a free port,
streaming completions on a fixed schedule (time to first token, inter-token latency)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

TTFT_S = 0.2
ITL_S = 0.05


@dataclass
class FakeServer:
    """An OpenAI-compatible /v1/completions that streams on a fixed schedule."""

    ttft_s: float = TTFT_S
    itl_s: float = ITL_S
    send_usage: bool = True
    status_by_max_tokens: dict[int, int] = field(default_factory=dict)
    """Requests asking for this many tokens get this HTTP status instead of a stream."""
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(time.perf_counter() on arrival, body) of every request."""

    def app(self) -> FastAPI:
        """The ASGI app."""
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            self.received.append((time.perf_counter(), body))
            status = self.status_by_max_tokens.get(body["max_tokens"])
            if status is not None:
                return JSONResponse({"error": {"message": f"forced status {status}"}},
                                    status_code=status)
            return StreamingResponse(self._events(body), media_type="text/event-stream")

        return app

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[str]:
        n = body["max_tokens"]
        # An empty first chunk, as servers send: it must not count as the first token.
        yield _sse({"choices": [{"index": 0, "text": ""}]})
        await asyncio.sleep(self.ttft_s)
        for k in range(n):
            if k:
                await asyncio.sleep(self.itl_s)
            yield _sse({"choices": [{"index": 0, "text": f" t{k}", "finish_reason": None}]})
        yield _sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            yield _sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                                 "total_tokens": n + 1}})
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@contextmanager
def serving(server: FakeServer) -> Iterator[str]:
    """Run `server` with uvicorn in a thread on a free port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=5)
        sock.close()
