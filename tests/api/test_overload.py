"""Overload: past `max_num_requests` held requests, new ones get 429 with Retry-After at
once, the held ones finish untouched, and every way a request ends gives its slot back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from shuffleinfer.api import create_app

from .conftest import REPLY, FakeBackend, metric, parse_sse
from .test_disconnect import FakeConnection

CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Hi!"}]}


@pytest.fixture
def limited(backend: FakeBackend) -> FastAPI:
    return create_app(backend, served_model_name="smol", max_num_requests=2, retry_after_s=7)


@pytest.fixture
async def http(limited: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def held(http: httpx.AsyncClient) -> float:
    return metric((await http.get("/metrics")).text, "shuffleinfer_requests_held")


async def test_past_the_limit_a_request_gets_429_and_the_held_ones_finish(
        http: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.first_delay_s = 0.5
    streamed = asyncio.create_task(http.post("/v1/chat/completions",
                                             json={**CHAT, "stream": True}))
    whole = asyncio.create_task(http.post("/v1/completions",
                                          json={"model": "smol", "prompt": "Hi"}))
    while len(backend.requests) < 2:
        await asyncio.sleep(0.01)
    assert await held(http) == 2

    refused = await http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "7"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == 429
    assert "--max-num-requests" in error["message"]
    assert len(backend.requests) == 2  # the refused one never reached the cluster

    first, second = await asyncio.gather(streamed, whole)
    text = "".join(e["choices"][0]["delta"].get("content", "")
                   for e in parse_sse(first.text)[:-1] if e["choices"])
    assert text == REPLY
    assert second.json()["choices"][0]["text"] == REPLY
    assert backend.aborted == []

    backend.first_delay_s = 0.0
    again = await http.post("/v1/chat/completions", json=CHAT)  # the slots came back
    assert again.status_code == 200
    text = (await http.get("/metrics")).text
    assert metric(text, "shuffleinfer_requests_total", endpoint="/v1/chat/completions",
                  status="429") == 1
    assert metric(text, "shuffleinfer_requests_held") == 0


async def test_failed_and_refused_requests_give_their_slots_back(
        http: httpx.AsyncClient, backend: FakeBackend) -> None:
    backend.fail_at = 0  # the backend fails before the first token
    for _ in range(5):
        failed = await http.post("/v1/chat/completions", json=CHAT)
        assert failed.status_code == 500
    bad = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
    assert bad.status_code == 400
    backend.fail_at = 3  # mid-stream: reported in the stream, then closed
    for _ in range(3):
        broken = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert broken.status_code == 200 and "error" in broken.text
    assert await held(http) == 0
    backend.fail_at = None
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("body", [{**CHAT, "stream": True}, CHAT], ids=["stream", "json"])
async def test_a_client_that_hangs_up_gives_its_slot_back(
        limited: FastAPI, http: httpx.AsyncClient, backend: FakeBackend,
        body: dict[str, Any]) -> None:
    backend.delay_s = 0.2
    for _ in range(4):  # twice the limit: each slot must come back
        connection = FakeConnection(body)
        task = asyncio.create_task(connection.run(limited, "/v1/chat/completions"))
        await asyncio.sleep(0.3)
        connection.hang_up()
        await asyncio.wait_for(task, 5)
    assert len(backend.aborted) == 4
    assert await held(http) == 0
