"""The request bodies of the generation routes, in the app's OpenAPI schema.

The routes read their bodies themselves (so every bad body becomes one OpenAI-style 400,
see `errors.parse_body`), which leaves FastAPI nothing to describe them from. Here each
body's pydantic model is put in `components/schemas` and the route's `requestBody`
points at it, so /openapi.json tells clients (and API fuzzers) what to send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


def describe_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]],
                            models: tuple[str, ...]) -> None:
    """Make `app.openapi()` describe each POST route of `bodies` (path -> model), whose
    `model` field may name one of `models` (the names this server answers to)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                if "model" in body["properties"]:
                    body["properties"]["model"]["anyOf"] = [
                        {"type": "string", "enum": list(models)}, {"type": "null"}]
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {
                        "$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
