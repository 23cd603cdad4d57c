"""Bad input, auth and backend failures: status codes and OpenAI-style error bodies."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from shuffleinfer.api import create_app
from shuffleinfer.protocol import BackendUnavailableError, TokenDelta

from .conftest import API_KEY, FakeBackend, parse_sse

CHAT = [{"role": "user", "content": "Hi!"}]


def assert_error(response: httpx.Response, status: int, param: str | None,
                 error_type: str = "invalid_request_error") -> str:
    """Check status and body shape; return the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (error_type, param, status)
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


BAD_COMPLETIONS: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("wrong type", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ("bool as int", {"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ("prompt type", {"prompt": 12}, "prompt", "prompt"),
    ("unknown field", {"prompt": "x", "foo": 1}, "foo", "`foo`"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -5}, "max_tokens", "greater than"),
    ("max_tokens huge", {"prompt": "x", "max_tokens": 10**30}, "max_tokens", "256 tokens"),
    ("seed huge", {"prompt": "x", "seed": 10**30}, "seed", "less than"),
    ("temperature high", {"prompt": "x", "temperature": 2.5}, "temperature", "less than"),
    ("temperature negative", {"prompt": "x", "temperature": -1}, "temperature", "greater"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, "top_p", "greater than"),
    ("top_p above one", {"prompt": "x", "top_p": 1.5}, "top_p", "less than"),
    ("logprobs range", {"prompt": "x", "logprobs": 21}, "logprobs", "less than"),
    ("n=2", {"prompt": "x", "n": 2}, "n", "`n`"),
    ("echo", {"prompt": "x", "echo": True}, "echo", "`echo`"),
    ("presence_penalty", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "0.5"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt", "only one prompt"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("empty id list", {"prompt": []}, "prompt", "empty"),
    ("out of vocab", {"prompt": [10**9]}, "prompt", "vocabulary"),
    ("prompt fills context", {"prompt": [5] * 256}, "prompt", "contains 256 tokens"),
    ("prompt + max_tokens", {"prompt": [5] * 200, "max_tokens": 57}, "max_tokens",
     "257 tokens (200 in the prompt, 57 in the completion)"),
    ("empty stop", {"prompt": "x", "stop": [""]}, "stop", "stop"),
    ("stream_options w/o stream", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options", "stream"),
    ("min_tokens > max_tokens", {"prompt": "x", "max_tokens": 2, "min_tokens": 3},
     "min_tokens", "min_tokens"),
]


@pytest.mark.parametrize("body,param,needle", [c[1:] for c in BAD_COMPLETIONS],
                         ids=[c[0] for c in BAD_COMPLETIONS])
async def test_bad_completion_requests_are_400_naming_the_field(
    client: httpx.AsyncClient, backend: FakeBackend, body: dict[str, Any], param: str,
    needle: str
) -> None:
    message = assert_error(await client.post("/v1/completions", json=body), 400, param)
    assert needle.lower() in message.lower()
    assert backend.requests == []


BAD_CHATS: list[tuple[str, dict[str, Any], str | None]] = [
    ("no messages", {"messages": []}, "messages"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
    ("tools", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("top_logprobs range", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("top_logprobs alone", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("max_completion_tokens 0", {"messages": CHAT, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("max_completion_tokens huge", {"messages": CHAT, "max_completion_tokens": 10**12},
     "max_completion_tokens"),
    ("n=2", {"messages": CHAT, "n": 2}, "n"),
    ("unknown stream option", {"messages": CHAT, "stream": True,
                               "stream_options": {"continuous_usage_stats": True}},
     "stream_options"),
]


@pytest.mark.parametrize("body,param", [c[1:] for c in BAD_CHATS], ids=[c[0] for c in BAD_CHATS])
async def test_bad_chat_requests_are_400_naming_the_field(
    client: httpx.AsyncClient, backend: FakeBackend, body: dict[str, Any], param: str
) -> None:
    assert_error(await client.post("/v1/chat/completions", json=body), 400, param)
    assert backend.requests == []


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x"', b"", b"[1, 2]", b'"text"', b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "\xff\xfe hi"}',                                  # invalid UTF-8
    b'{"prompt": "\\ud800 x"}',                                   # lone surrogate escape
    b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    b"\xff\xfe\x00",
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, raw: bytes,
                                        path: str) -> None:
    response = await client.post(path, content=raw,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(("Malformed JSON body", "The request body must be",
                                        "Invalid value for `temperature`")), error


async def test_unknown_model_is_404_and_backend_name_is_accepted(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"model": "gpt-4", "messages": CHAT})
    message = assert_error(response, 404, "model", "not_found_error")
    assert message == "The model `gpt-4` does not exist."

    response = await client.post("/v1/chat/completions",
                                 json={"model": backend.model_name, "messages": CHAT})
    assert response.status_code == 200
    assert response.json()["model"] == backend.model_name


async def test_unknown_route_and_wrong_method_use_the_error_body(
    client: httpx.AsyncClient
) -> None:
    assert_error(await client.get("/v1/nothing"), 404, None, "not_found_error")
    assert_error(await client.get("/v1/completions"), 405, None)


async def test_framework_validation_errors_are_400_not_422(app: FastAPI) -> None:
    @app.get("/v1/probe")
    async def probe(limit: int) -> int:
        return limit

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        message = assert_error(await client.get("/v1/probe?limit=abc"), 400, "limit")
    assert "integer" in message


async def test_api_key_guards_v1_but_not_health_or_metrics(backend: FakeBackend) -> None:
    app = create_app(backend, api_key=API_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = await client.post("/v1/chat/completions", json={"messages": CHAT},
                                         headers=headers)
            assert_error(response, 401, None, "authentication_error")
        assert_error(await client.get("/v1/models"), 401, None, "authentication_error")
        assert backend.requests == []

        ok = await client.post("/v1/chat/completions", json={"messages": CHAT},
                               headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error,status,error_type", [
    (RuntimeError("engine exploded"), 500, "server_error"),
    (BackendUnavailableError("all queues full"), 503, "service_unavailable_error"),
])
async def test_backend_failure_before_first_token_is_an_http_error(
    client: httpx.AsyncClient, backend: FakeBackend, stream: bool, error: Exception,
    status: int, error_type: str
) -> None:
    backend.fail_at, backend.error = 0, error

    response = await client.post("/v1/chat/completions",
                                 json={"messages": CHAT, "stream": stream})

    message = assert_error(response, status, None, error_type)
    assert str(error) in message


async def test_backend_failure_mid_stream_is_an_error_event_then_done(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.fail_at = 2

    response = await client.post("/v1/completions", json={"prompt": "x", "stream": True})

    assert response.status_code == 200
    *chunks, error_event, done = parse_sse(response.text)
    assert [c["choices"][0]["text"] for c in chunks] == [
        backend.tokenizer.decode([t]) for t in backend.reply_ids[:2]]
    assert error_event["error"]["type"] == "server_error"
    assert "engine exploded" in error_event["error"]["message"]
    assert done == "[DONE]"


async def test_backend_failure_mid_request_without_stream_is_500(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.fail_at = 2
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 500, None,
                 "server_error")


@pytest.mark.parametrize("finish,status", [("error", 500), ("abort", 503)])
async def test_backend_reporting_a_failed_finish_is_an_error(
    client: httpx.AsyncClient, backend: FakeBackend, finish: Any, status: int
) -> None:
    backend.script = lambda request: [TokenDelta((5,), "a"), TokenDelta((6,), "",
                                                                        finish_reason=finish)]
    assert_error(await client.post("/v1/completions", json={"prompt": "x"}), status, None,
                 "server_error" if status == 500 else "service_unavailable_error")


async def test_backend_stream_without_finish_reason_is_an_error(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.script = lambda request: [TokenDelta((5,), "a")]
    response = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    events = parse_sse(response.text)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert json.dumps(events).count('"finish_reason": "stop"') == 0


async def test_backend_refusing_the_request_outright_is_503(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    def refuse(request: Any) -> Any:
        raise BackendUnavailableError("no decode instance is ready")

    backend.generate = refuse  # type: ignore[method-assign]
    response = await client.post("/v1/chat/completions", json={"messages": CHAT})
    message = assert_error(response, 503, None, "service_unavailable_error")
    assert "no decode instance is ready" in message
