"""The OpenAI-compatible HTTP api in front of a `Backend`.

A generation request's path through this module: authenticate (`/v1/*` only), parse the
body into a strict request model, render and tokenise the prompt into a
`GenerateRequest`, wait for the first token, then answer with one JSON body or an SSE
stream. Every error is an OpenAI-style body (see `errors.py`); every request that leaves
is counted in `shuffleinfer_requests_total`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from shuffleinfer.api.admin import AdminRoutes
from shuffleinfer.api.errors import check_bearer, install_error_handlers, parse_body
from shuffleinfer.api.generation import Generation, cancel_on_disconnect
from shuffleinfer.api.limits import RequestLimit
from shuffleinfer.api.metrics import ApiMetrics
from shuffleinfer.api.openai_models import ChatCompletionRequest, CompletionRequest
from shuffleinfer.api.openapi import describe_request_bodies
from shuffleinfer.api.prediction_metrics import PredictionMetrics
from shuffleinfer.api.preprocess import check_common, prepare_chat, prepare_completion
from shuffleinfer.api.serialization import ChatFormatter, CompletionFormatter, Formatter
from shuffleinfer.api.streaming import EventStream, SSEResponse
from shuffleinfer.protocol import Backend, GenerateRequest

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
COUNTED_ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS, MODELS)
"""Endpoints counted in shuffleinfer_requests_total; other paths count as "other"."""

CLIENT_CLOSED_REQUEST = 499
"""Status of the (unread) response to a client that disconnected, as nginx logs it."""


def endpoint_label(request: Request) -> str:
    """The `endpoint` label of a request: its route, or "other" for unknown paths."""
    path = request.url.path
    return path if path in COUNTED_ENDPOINTS else "other"


class Server:
    """The state behind the routes: backend, model names, api key and metrics."""

    def __init__(self, backend: Backend, served_model_name: str, api_key: str | None, *,
                 max_num_requests: int, retry_after_s: int):
        self.backend = backend
        self.served_model_name = served_model_name
        self.accepted_models = tuple(dict.fromkeys((served_model_name, backend.model_name)))
        """Names a request's `model` may use: the served name, or the backend's own."""
        self.api_key = api_key
        self.metrics = ApiMetrics()
        self.limit = RequestLimit(max_num_requests, retry_after_s, self.metrics.requests_held)
        self.prediction_metrics = PredictionMetrics(self.metrics.registry)
        self.created = int(time.time())

    async def check_api_key(self, request: Request) -> None:
        """FastAPI dependency of /v1/*: 401 unless `Authorization: Bearer <api_key>`."""
        if self.api_key is None:
            return
        check_bearer(request, self.api_key,
                     "Invalid or missing API key: send `Authorization: Bearer <key>`.")

    async def read_body(self, request: Request, endpoint: str) -> bytes | None:
        """The request's body; None (counted as aborted) if the client left while sending it."""
        try:
            return await request.body()
        except ClientDisconnect:
            self.metrics.count_request(endpoint, "aborted")
            return None

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        arrived_at = self.metrics.clock()
        raw = await self.read_body(request, COMPLETIONS)
        if raw is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = parse_body(CompletionRequest, raw)
        model = check_common(body, self.accepted_models)
        generate_request = prepare_completion(body, self.backend.tokenizer,
                                              self.backend.max_model_len)
        formatter = CompletionFormatter(
            generate_request.req_id, model, include_usage=body.include_usage(),
            logprobs=generate_request.sampling.logprobs is not None)
        return await self.serve(request, generate_request, formatter, stream=bool(body.stream),
                                arrived_at=arrived_at, endpoint=COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        arrived_at = self.metrics.clock()
        raw = await self.read_body(request, CHAT_COMPLETIONS)
        if raw is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = parse_body(ChatCompletionRequest, raw)
        model = check_common(body, self.accepted_models)
        generate_request = prepare_chat(body, self.backend.tokenizer,
                                        self.backend.max_model_len)
        formatter = ChatFormatter(
            generate_request.req_id, model, include_usage=body.include_usage(),
            logprobs=generate_request.sampling.logprobs is not None)
        return await self.serve(request, generate_request, formatter, stream=bool(body.stream),
                                arrived_at=arrived_at, endpoint=CHAT_COMPLETIONS)

    async def serve(
        self,
        request: Request,
        generate_request: GenerateRequest,
        formatter: Formatter,
        *,
        stream: bool,
        arrived_at: float,
        endpoint: str,
    ) -> Response:
        """Run the request on the backend and answer with JSON or an SSE stream.

        Errors before the first token raise `APIError` (an HTTP error status); after it,
        a stream reports them in-band. A client that disconnects aborts the request. With
        `max_num_requests` held already, the request is refused (429) before it starts.
        """
        slot = self.limit.take()
        num_prompt_tokens = len(generate_request.prompt_token_ids)
        request_metrics = self.metrics.start_request(arrived_at)
        request_metrics.set_prompt(num_prompt_tokens)
        generation = Generation(self.backend, generate_request, request_metrics)

        async def respond_streamed() -> Response:
            await generation.first_delta()
            events = EventStream(generation, formatter, num_prompt_tokens=num_prompt_tokens)

            async def on_close() -> None:
                try:
                    await generation.close()
                finally:
                    slot.release()
                self.metrics.count_request(endpoint, events.status)

            return SSEResponse(events.events(), on_close=on_close)

        async def respond_json() -> Response:
            try:
                async with aclosing(generation.deltas()) as deltas:
                    collected = [delta async for delta in deltas]
            finally:
                await generation.close()
            self.metrics.count_request(endpoint, 200)
            return JSONResponse(formatter.response(collected, num_prompt_tokens))

        response: Response | None = None
        try:
            response = await cancel_on_disconnect(
                request, respond_streamed() if stream else respond_json())
        finally:
            if not isinstance(response, SSEResponse):
                slot.release()  # (a stream gives its slot back when it closes)
        if response is None:
            self.metrics.count_request(endpoint, "aborted")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return response

    async def models(self) -> dict[str, Any]:
        """GET /v1/models: the served model, in OpenAI's list format."""
        self.metrics.count_request(MODELS, 200)
        return {"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": self.created,
            "owned_by": "shuffleinfer", "root": self.backend.model_name,
            "max_model_len": self.backend.max_model_len,
        }]}

    async def health(self) -> JSONResponse:
        """GET /health: 200 "ok" when every instance is ready, 200 "degraded" when some are
        not but every role still has a ready one, else 503 "unavailable"; all list the
        instances."""
        try:
            report = await self.backend.health()
        except Exception:
            logger.exception("backend.health() failed")
            return JSONResponse({"status": "unavailable", "instances": []}, status_code=503)
        status = report.status
        body = {"status": status,
                "instances": [dataclasses.asdict(load) for load in report.instances]}
        return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

    async def prometheus(self) -> Response:
        """GET /metrics: this app's registry, with KV and prediction counters refreshed
        from the backend."""
        await self.metrics.refresh_kv(self.backend)
        await self.metrics.refresh_failovers(self.backend)
        await self.prediction_metrics.refresh(self.backend)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    backend: Backend,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    admin_token: str | None = None,
    max_num_requests: int = 1024,
    retry_after_s: int = 1,
) -> FastAPI:
    """Build the OpenAI-compatible app serving `backend`.

    `served_model_name` is the name clients use (default: `backend.model_name`, which is
    accepted too). With `api_key` set, /v1/* needs `Authorization: Bearer <api_key>`;
    /health and /metrics stay open. /admin/* needs `Authorization: Bearer <admin_token>`
    and answers 403 without an `admin_token` (see `admin.py`); neither secret opens the
    other's routes. At most `max_num_requests` generation requests are held at once; past
    it, 429 with `Retry-After: retry_after_s` (see `limits.py`). The app's metrics live in
    `app.state.metrics`.
    """
    server = Server(backend, served_model_name or backend.model_name, api_key,
                    max_num_requests=max_num_requests, retry_after_s=retry_after_s)
    app = FastAPI(title="ShuffleInfer", summary="OpenAI-compatible LLM serving")
    app.state.server = server
    app.state.metrics = server.metrics
    install_error_handlers(
        app, on_error=lambda request, status: server.metrics.count_request(
            endpoint_label(request), status))

    v1 = APIRouter(dependencies=[Depends(server.check_api_key)])
    v1.add_api_route(COMPLETIONS, server.completions, methods=["POST"])
    v1.add_api_route(CHAT_COMPLETIONS, server.chat_completions, methods=["POST"])
    v1.add_api_route(MODELS, server.models, methods=["GET"])
    app.include_router(v1)
    app.include_router(AdminRoutes(backend, admin_token, server.metrics).router())
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"])
    describe_request_bodies(app, {COMPLETIONS: CompletionRequest,
                                  CHAT_COMPLETIONS: ChatCompletionRequest},
                            server.accepted_models)
    return app
