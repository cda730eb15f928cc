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
from fastapi.responses import JSONResponse, Response
from starlette._utils import get_route_path  # private, but the router's own reading of a path
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from deployments.ingress.dataplane import CLIENT_CLOSED
from serve_app.core import errors
from serve_app.core.errors import ServeAppError, field_path, retry_after_s, unwrap

logger = logging.getLogger("ray.serve")

_HTTP_ERRORS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class BodyError(StarletteHTTPException):
    """An error of the request body found while it streams in (FastAPI lets HTTP exceptions through its body
    parsing), carrying the core error, so that HTTP and gRPC say the same."""

    def __init__(self, error: ServeAppError, headers: dict[str, str] | None = None) -> None:
        self.error = error
        super().__init__(error.status_code, error.message, headers)

    def body(self) -> dict[str, Any]:
        return self.error.body()


class PayloadTooLarge(BodyError):
    """A body over ``max_body_bytes``: answered before it is read when its Content-Length says so, else
    raised while it streams in."""

    def __init__(self, limit: int) -> None:
        super().__init__(errors.PayloadTooLarge(limit))
        self.limit = limit


class BodyTimeout(BodyError):
    """A body not received whole within ``body_timeout_s``: 408, and the connection is closed (the rest of
    the body is never read)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            errors.RequestBodyTimeout(
                f"the request body did not arrive within {timeout_s:g}s (body_timeout_s)", timeout_s=timeout_s
            ),
            headers={"connection": "close"},
        )


def route_path(scope: Scope) -> str:
    """The request path inside the application (its route prefix removed), as Starlette's router reads it: a
    check that read it otherwise (``/models/x/load`` under the prefix ``/m``, say) would not check the route
    that runs."""
    return get_route_path(scope)


def error_body(scope: Scope, body: dict[str, Any]) -> dict[str, Any]:
    """The native error shape, or the Open Inference Protocol's ``{"error": message}`` under /v2."""
    if route_path(scope).startswith("/v2"):
        return {"error": body.get("message", body.get("error", "error"))}
    return body


def _json(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(request.scope, body), headers=headers)


def error_headers(exc: ServeAppError) -> dict[str, str] | None:
    """The headers an error's answer carries: ``Retry-After`` when the error says when to come again."""
    retry = retry_after_s(exc)
    return {"Retry-After": str(retry)} if retry is not None else None


def _app_json(request: Request, exc: ServeAppError) -> JSONResponse:
    return _json(request, exc.status_code, exc.body(), error_headers(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the JSON shape above."""

    @app.exception_handler(ServeAppError)
    async def _app_error(request: Request, exc: ServeAppError) -> JSONResponse:
        return _app_json(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")} for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return _json(request, 422, {"error": "invalid_request", "message": message, "problems": problems})

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client closed its connection before its body had all arrived: nothing to answer it, and nothing
        of the server's failed (no 500, no error log; anyone could fill the log and the 5xx count with it).
        Its status, nginx's 499, is what Serve's request log and metrics record."""
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyError):
            return _json(request, exc.status_code, exc.body(), exc.headers)
        error = _HTTP_ERRORS.get(exc.status_code, "http_error")
        return _json(request, exc.status_code, {"error": error, "message": str(exc.detail)}, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, ServeAppError):
            return _app_json(request, inner)
        logger.exception("unhandled error: %s", exc)  # the details go to the log, not to the client
        return _json(request, 500, {"error": "internal_error", "message": f"internal error ({type(inner).__name__})"})
