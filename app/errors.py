"""One JSON shape for every error the service answers.

    {"error": "<human-readable message>", "status": 415, "code": "unsupported_media_type"}

`error` is a string, so the body is also a valid Open Inference Protocol v2 error. 503 answers
carry `Retry-After`, 401 answers `WWW-Authenticate: Bearer`. No stack trace and no HTML ever
reaches a client: FastAPI's validation errors, Starlette's 404/405 and anything unexpected are
all rewritten here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("app.errors")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    499: "client_closed_request",  # nginx's code: logged and counted, the client is gone
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    504: "timeout",
}

RETRY_AFTER_S = 1


class ErrorBody(BaseModel):
    """The body of every error response (for the OpenAPI schema)."""

    error: str
    status: int
    code: str


class ApiError(Exception):
    """An error the service answers deliberately, with its status and a message for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or CODES.get(status, "error")
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    body = {"error": message, "status": status, "code": code or CODES.get(status, "error")}
    return JSONResponse(body, status_code=status, headers=headers)


#: Documented error answers, for `responses=` on routes.
def error_responses(*statuses: int) -> dict[int | str, dict]:
    return {
        status: {"model": ErrorBody, "description": CODES.get(status, "error")}
        for status in statuses
    }


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.code, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else CODES.get(exc.status_code, "error")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405 and message == "Method Not Allowed":
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, message, headers=exc.headers)


def _describe_validation(errors: list[dict]) -> str:
    """`query.top_k: Input should be greater than or equal to 1`; never echoes the input value."""
    parts = []
    for error in errors[:10]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, _describe_validation(list(exc.errors())))


def unexpected_error(exc: Exception, method: str, path: str) -> JSONResponse:
    """500 for an exception nobody expected; the traceback goes to the log, never the client."""
    logger.error("unhandled %s on %s %s", type(exc).__name__, method, path, exc_info=exc)
    return error_response(500, "internal server error")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error(exc, request.method, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
