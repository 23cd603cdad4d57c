"""Admin routes: list the instances with their role, state and load; drain, resume or
flip one.

An admin call's path: 403 when the app was built without an admin token; 401 unless the
call carries `Authorization: Bearer <admin token>` (the /v1 api key does not count); then
the body is parsed (flip only: an optional `{"role": "prefill" | "decode"}`), and the
backend acts. Its refusals become OpenAI-style errors: an instance it does not know is a
404; a change it cannot make now (the last active instance of a role, a flip to the role
the instance has) is a 409 carrying the backend's reason. Every call is counted in
`shuffleinfer_admin_actions_total{action, outcome}`; every drain, resume and flip, and
every refused call, is logged as a warning.

A flip answers 202 while the instance drains before it takes its new role, or 200 when
it was idle and the change is already done.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shuffleinfer.api.errors import APIError, check_bearer, error_type, parse_body
from shuffleinfer.api.metrics import ApiMetrics
from shuffleinfer.protocol import (
    Backend,
    InstanceLoad,
    InstanceRole,
    RoleChangeError,
    UnknownInstanceError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

INSTANCES = "/admin/instances"
DISABLED_MESSAGE = ("Admin routes are disabled: start the server with --admin-token (or "
                    "SHUFFLEINFER_ADMIN_TOKEN)")
BAD_TOKEN_MESSAGE = ("Invalid or missing admin token: send `Authorization: Bearer "
                     "<admin token>`.")


class FlipRequest(BaseModel):
    """The optional JSON body of POST /admin/instances/{instance_id}/flip."""

    model_config = ConfigDict(extra="forbid")

    role: InstanceRole | None = Field(default=None, description=(
        "The role the instance takes; None (or no body) takes the other one."))


class AdminRoutes:
    """The /admin/* routes over `backend`, guarded by `admin_token` (None disables them)."""

    def __init__(self, backend: Backend, admin_token: str | None, metrics: ApiMetrics) -> None:
        self.backend = backend
        self.admin_token = admin_token
        self.metrics = metrics

    def router(self) -> APIRouter:
        """The routes, to mount on the app."""
        router = APIRouter()
        router.add_api_route(INSTANCES, self.instances, methods=["GET"])
        for action in (self.drain, self.resume, self.flip):
            router.add_api_route(f"{INSTANCES}/{{instance_id}}/{action.__name__}", action,
                                 methods=["POST"])
        return router

    def check_token(self, request: Request) -> None:
        """403 when admin routes are disabled, else 401 unless the admin token is sent."""
        if not self.admin_token:  # "" too: an empty bearer must not open them
            raise APIError(403, DISABLED_MESSAGE)
        check_bearer(request, self.admin_token, BAD_TOKEN_MESSAGE)

    async def instances(self, request: Request) -> dict[str, Any]:
        """GET /admin/instances: every instance with its role, state and load."""
        loads = await self.guarded(request, "list", None, self.backend.instances)
        return {"object": "list", "data": [dataclasses.asdict(load) for load in loads]}

    async def drain(self, instance_id: str, request: Request) -> dict[str, Any]:
        """POST /admin/instances/{instance_id}/drain: no new work; what it holds finishes."""
        load = await self.guarded(request, "drain", instance_id,
                                  lambda: self.backend.drain(instance_id))
        return dataclasses.asdict(load)

    async def resume(self, instance_id: str, request: Request) -> dict[str, Any]:
        """POST /admin/instances/{instance_id}/resume: a drained instance takes work again."""
        load = await self.guarded(request, "resume", instance_id,
                                  lambda: self.backend.resume(instance_id))
        return dataclasses.asdict(load)

    async def flip(self, instance_id: str, request: Request) -> JSONResponse:
        """POST /admin/instances/{instance_id}/flip: 202 while it drains before taking the
        new role, 200 when the change is already done."""

        async def parse_and_flip() -> InstanceLoad:
            raw = await request.body()
            body = parse_body(FlipRequest, raw) if raw.strip() else FlipRequest()
            return await self.backend.flip(instance_id, body.role)

        load = await self.guarded(request, "flip", instance_id, parse_and_flip)
        return JSONResponse(dataclasses.asdict(load),
                            status_code=202 if load.state == "flipping" else 200)

    async def guarded(self, request: Request, action: str, instance_id: str | None,
                      run: Callable[[], Awaitable[T]]) -> T:
        """Check the token, then `run` the action, turning the backend's refusals into
        404 / 409; count and log the outcome either way."""
        try:
            self.check_token(request)
            try:
                result = await run()
            except UnknownInstanceError as e:
                raise APIError(404, f"No instance {instance_id!r}: GET {INSTANCES} lists "
                                    "them.") from e
            except RoleChangeError as e:
                raise APIError(409, str(e)) from e
        except APIError as e:
            self.record(action, instance_id, error_type(e.status_code), e.message)
            raise
        except Exception as e:
            # The app's handler answers 500 and logs the traceback.
            self.record(action, instance_id, error_type(500), type(e).__name__)
            raise
        now = f"now {result.role}, {result.state}" if isinstance(result, InstanceLoad) else ""
        self.record(action, instance_id, "ok", now)
        return result

    def record(self, action: str, instance_id: str | None, outcome: str, detail: str) -> None:
        """Count the call; log it unless it is a listing that succeeded (polled often)."""
        self.metrics.count_admin_action(action, outcome)
        if action == "list" and outcome == "ok":
            return
        target = f" {instance_id}" if instance_id is not None else ""
        logger.warning("admin %s%s: %s%s", action, target, outcome,
                       f" ({detail})" if detail else "")
