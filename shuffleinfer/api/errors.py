"""One OpenAI-style error body for every failure the api reports.

Every error leaves the server as
`{"error": {"message": str, "type": str, "param": str | None, "code": int}}`, whether it
comes from request validation, a handler, an unknown route, or the backend mid-stream.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the api answers with `status_code` and an OpenAI-style body."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.headers = headers
        """Sent with the error (e.g. Retry-After on a 429)."""

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.status_code, self.message, param=self.param)


def error_type(status_code: int) -> str:
    """The OpenAI error `type` of `status_code`."""
    return ERROR_TYPES.get(status_code, "server_error" if status_code >= 500 else
                           "invalid_request_error")


def error_body(status_code: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """Build the OpenAI-style error body for `status_code`."""
    return {"error": {"message": message, "type": error_type(status_code), "param": param,
                      "code": status_code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400 error, for input the client must fix."""
    return APIError(400, message, param=param)


def from_validation_errors(errors: list[ErrorDetails], *, from_fastapi: bool = False
                           ) -> APIError:
    """Turn pydantic errors into one 400 that names the first offending field.

    `from_fastapi` drops FastAPI's leading location element ("body", "query", ...).
    """
    if not errors:
        return bad_request("Invalid request.")
    first = errors[0]
    loc = list(first["loc"][1:] if from_fastapi else first["loc"])
    if first["type"] == "json_invalid":
        return bad_request(f"Malformed JSON body: {first['msg']}")
    if first["type"] == "model_type" and not loc:
        return bad_request("The request body must be a JSON object.")
    path = ".".join(str(part) for part in loc)
    param = str(loc[0]) if loc else None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unknown field `{path}`: this field is not supported.", param)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for `{path}`: {first['msg']}{more}", param)


def from_pydantic(error: ValidationError) -> APIError:
    """A 400 for a pydantic ValidationError raised while parsing a request body."""
    return from_validation_errors(error.errors(include_url=False))


def parse_body(model: type[ModelT], raw: bytes) -> ModelT:
    """Parse a JSON body into `model`; malformed or invalid input is a 400 `APIError`."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise from_pydantic(e) from e


def check_bearer(request: Request, secret: str, message: str) -> None:
    """401 with `message` unless the request carries `Authorization: Bearer <secret>`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                secret.encode()):
        raise APIError(401, message)


def install_error_handlers(
    app: FastAPI, on_error: Callable[[Request, int], None] | None = None
) -> None:
    """Make every error the app returns use the OpenAI body, with 400 (not 422) for bad input.

    `on_error(request, status_code)` is called for each error response (used for metrics).
    """

    def respond(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(request, error.status_code)
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else {}
        return JSONResponse(error.body(), status_code=error.status_code,
                            headers={**headers, **(error.headers or {})})

    async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)  # registered for APIError only
        return respond(request, exc)

    async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors: list[ErrorDetails] = list(exc.errors())
        return respond(request, from_validation_errors(errors, from_fastapi=True))

    async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return respond(request, APIError(exc.status_code, message))

    async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return respond(request, APIError(500, f"Internal server error: {type(exc).__name__}"))

    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected)
