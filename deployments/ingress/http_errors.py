"""The one mapping of errors to HTTP responses.

Every error the HTTP API returns is JSON of the same shape::

    {"error": "model_not_found", "message": "Unknown model 'x'. Known models: ...", ...details}

and, under ``/v2``, the Open Inference Protocol's ``{"error": "<message>"}`` (``error_body``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from serve_app.core import errors
from serve_app.core.errors import ServeAppError, field_path, unwrap

logger = logging.getLogger("ray.serve")

_HTTP_ERRORS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class PayloadTooLarge(StarletteHTTPException):
    """A body over ``max_body_bytes``: answered before it is read when its Content-Length says so, else
    raised while it streams in (FastAPI lets HTTP exceptions through its body parsing). It carries the
    core error, so that HTTP and gRPC say the same."""

    def __init__(self, limit: int) -> None:
        self.error = errors.PayloadTooLarge(limit)
        super().__init__(self.error.status_code, self.error.message)
        self.limit = limit

    def body(self) -> dict[str, Any]:
        return self.error.body()


def route_path(scope: Scope) -> str:
    """The request path inside the application (its route prefix removed)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def error_body(scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
    """The native error shape, or the Open Inference Protocol's ``{"error": message}`` under /v2."""
    if route_path(scope).startswith("/v2"):
        return {"error": body.get("message", body.get("error", "error"))}
    return body


def _json(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(request.scope, body), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the JSON shape above."""

    @app.exception_handler(ServeAppError)
    async def _app_error(request: Request, exc: ServeAppError) -> JSONResponse:
        return _json(request, exc.status_code, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return _json(request, 422, {"error": "invalid_request", "message": message, "problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, PayloadTooLarge):
            return _json(request, 413, exc.body())
        error = _HTTP_ERRORS.get(exc.status_code, "http_error")
        return _json(request, exc.status_code, {"error": error, "message": str(exc.detail)}, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, ServeAppError):
            return _json(request, inner.status_code, inner.body())
        logger.exception("unhandled error: %s", exc)  # the details go to the log, not to the client
        return _json(request, 500, {"error": "internal_error", "message": f"internal error ({type(inner).__name__})"})
