"""Fuzzing the api from its own OpenAPI schema (schemathesis): valid and invalid bodies,
queries and headers for every operation; no input may get a server error (5xx), and
every 4xx keeps the OpenAI error body.

Driven through Hypothesis directly: schemathesis's pytest plugin reads a pytest private
(`Item._nodeid`) that pytest 9 no longer has.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from .conftest import FakeBackend

EXAMPLES_PER_OPERATION = 60


def openai_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx says what went wrong, in OpenAI's shape."""
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == response.status_code and error["message"], error
    return None


def operations(app: FastAPI) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_describes_the_generation_bodies(app: FastAPI) -> None:
    spec = app.openapi()
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "stream"} <= set(fields)
    bodies = {op.path: op.body for op in operations(app) if op.method.upper() == "POST"}
    assert len(bodies["/v1/chat/completions"]) == 1  # schemathesis reads it too


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_input_gets_a_server_error(app: FastAPI, backend: FakeBackend,
                                      mode: GenerationMode) -> None:
    tried = []
    for operation in operations(app):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error, openai_error_body])

        try:
            call()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
            assert mode == GenerationMode.NEGATIVE, operation.label
            continue
        tried.append(operation.label)
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(tried), tried
    if mode == GenerationMode.POSITIVE:  # valid requests got as far as the backend
        assert backend.requests, "no generated request reached the backend"
