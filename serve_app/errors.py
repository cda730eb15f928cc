"""The error types of the application and their one mapping to HTTP.

Every error the API returns is JSON of the same shape::

    {"error": "model_not_found", "message": "Unknown model 'x'. Known models: ...", ...details}

Errors raised inside a worker replica travel back through Ray; they pickle
with their details intact, and ``unwrap`` recovers them from Ray's wrapper.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


def _rebuild(cls: type["ServeAppError"], message: str, details: dict[str, Any]) -> "ServeAppError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message = message
    err.details = details
    return err


class ServeAppError(Exception):
    status_code: int = 500
    error: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.details))

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, **self.details}


class InvalidInput(ServeAppError):
    """The request is well-formed JSON but its content does not fit the model."""

    status_code = 422
    error = "invalid_input"


class BadImage(ServeAppError):
    """The bytes given as an image cannot be decoded as one."""

    status_code = 400
    error = "bad_image"


class ForbiddenPath(ServeAppError):
    status_code = 403
    error = "forbidden_path"


class ModelNotFound(ServeAppError):
    status_code = 404
    error = "model_not_found"

    def __init__(self, model_id: str, known: list[str]) -> None:
        super().__init__(
            f"Unknown model {model_id!r}. Known models: {', '.join(known)}",
            model_id=model_id,
            known_models=known,
        )


class ModelUnavailable(ServeAppError):
    """The model is registered but could not be loaded or run (missing files, crash)."""

    status_code = 503
    error = "model_unavailable"


class RequestTimeout(ServeAppError):
    status_code = 504
    error = "timeout"


def unwrap(exc: BaseException) -> BaseException:
    """The application error behind a Ray wrapper (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while not isinstance(exc, ServeAppError) and getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc


_HTTP_ERRORS = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _json(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    from serve_app.middleware import error_body

    return JSONResponse(status_code=status, content=error_body(request.scope, body), headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the JSON shape above, in one place."""

    @app.exception_handler(ServeAppError)
    async def _app_error(request: Request, exc: ServeAppError) -> JSONResponse:
        return _json(request, exc.status_code, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return _json(request, 422, {"error": "invalid_request", "message": message, "problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = _HTTP_ERRORS.get(exc.status_code, "http_error")
        return _json(request, exc.status_code, {"error": error, "message": str(exc.detail)}, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, ServeAppError):
            return _json(request, inner.status_code, inner.body())
        logger.exception("unhandled error: %s", exc)  # the details go to the log, not to the client
        return _json(request, 500, {"error": "internal_error", "message": f"internal error ({type(inner).__name__})"})
