"""A client that goes away aborts its request in the backend, promptly.

httpx's ASGI transport buffers whole responses and never disconnects, so these tests talk
ASGI directly, the way uvicorn does: `receive()` yields the body, then blocks until the
client is gone and reports `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import Message

from .conftest import FakeBackend, metric

CHAT = {"messages": [{"role": "user", "content": "Hi!"}]}


class FakeConnection:
    """One HTTP connection to an ASGI app; the client hangs up on `hang_up()`."""

    def __init__(self, body: dict[str, Any], *, spec_version: str = "2.3") -> None:
        self.body = json.dumps(body).encode()
        self.spec_version = spec_version
        self.gone = asyncio.Event()
        self.body_sent = False
        self.chunks: list[bytes] = []
        self.status: int | None = None

    def hang_up(self) -> None:
        self.gone.set()

    async def receive(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone.is_set() and self.spec_version >= "2.4":
            raise OSError("connection reset by peer")  # what ASGI 2.4 servers do
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.chunks.append(message["body"])

    async def run(self, app: FastAPI, path: str) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": self.spec_version},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000), "server": ("test", 80),
        }
        # Starlette re-raises a reset connection as ClientDisconnect; the server logs it.
        with contextlib.suppress(ClientDisconnect):
            await asyncio.wait_for(app(scope, self.receive, self.send), timeout=5)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_disconnect_mid_stream_closes_the_backend_stream(
    app: FastAPI, backend: FakeBackend, spec_version: str
) -> None:
    backend.delay_s = 0.05  # the whole reply would take about a second
    connection = FakeConnection({**CHAT, "stream": True}, spec_version=spec_version)

    async def hang_up_after_two_chunks() -> None:
        while len(connection.chunks) < 2:
            await asyncio.sleep(0.005)
        connection.hang_up()

    started = time.perf_counter()
    hang_up = asyncio.ensure_future(hang_up_after_two_chunks())
    await connection.run(app, "/v1/chat/completions")
    await hang_up

    assert connection.status == 200
    assert time.perf_counter() - started < 0.5
    (request,) = backend.requests
    assert backend.aborted == [request.req_id] and backend.completed == []
    assert not any(b"[DONE]" in chunk for chunk in connection.chunks)
    await assert_counted_as_aborted(app, "/v1/chat/completions")


async def test_disconnect_while_waiting_for_a_non_streamed_reply(
    app: FastAPI, backend: FakeBackend
) -> None:
    backend.delay_s = 0.05
    connection = FakeConnection({"prompt": "x"})
    asyncio.get_running_loop().call_later(0.1, connection.hang_up)

    started = time.perf_counter()
    await connection.run(app, "/v1/completions")

    assert time.perf_counter() - started < 0.5
    assert len(backend.aborted) == 1 and backend.completed == []
    await assert_counted_as_aborted(app, "/v1/completions")


async def test_disconnect_before_the_first_token(app: FastAPI, backend: FakeBackend) -> None:
    backend.first_delay_s = 1.0
    connection = FakeConnection({**CHAT, "stream": True})
    asyncio.get_running_loop().call_later(0.05, connection.hang_up)

    await connection.run(app, "/v1/chat/completions")

    assert connection.chunks == []
    assert len(backend.aborted) == 1


class HalfBodyConnection(FakeConnection):
    """A client that hangs up halfway through sending its body."""

    async def receive(self) -> Message:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": self.body[:5], "more_body": True}
        return {"type": "http.disconnect"}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_disconnect_while_sending_the_body_is_no_server_error(
    app: FastAPI, backend: FakeBackend, path: str
) -> None:
    connection = HalfBodyConnection(CHAT if "chat" in path else {"prompt": "x"})
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}

    await asyncio.wait_for(app(scope, connection.receive, connection.send), timeout=5)

    assert connection.status == 499 and backend.requests == []
    await assert_counted_as_aborted(app, path)


async def test_cancelled_client_call_aborts_the_request(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.delay_s = 0.05
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "x"}), 0.1)

    assert len(backend.aborted) == 1 and backend.completed == []


async def test_finished_requests_are_not_aborted(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    await client.post("/v1/completions", json={"prompt": "x"})
    await client.post("/v1/completions", json={"prompt": "x", "stream": True})

    assert backend.aborted == [] and len(backend.completed) == 2


async def assert_counted_as_aborted(app: FastAPI, endpoint: str) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        text = (await client.get("/metrics")).text
    assert metric(text, "shuffleinfer_requests_total", endpoint=endpoint, status="aborted") == 1
    assert metric(text, "shuffleinfer_requests_total", endpoint=endpoint, status="200") == 0
