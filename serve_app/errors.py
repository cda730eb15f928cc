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


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(status_code=status, content=body)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the JSON shape above, in one place."""

    @app.exception_handler(ServeAppError)
    async def _app_error(_: Request, exc: ServeAppError) -> JSONResponse:
        return _json(exc.status_code, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return _json(422, {"error": "invalid_request", "message": message, "problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, {"error": "http_error", "message": str(exc.detail)})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        inner = unwrap(exc)
        if isinstance(inner, ServeAppError):
            return _json(inner.status_code, inner.body())
        logger.exception("unhandled error: %s", exc)
        return _json(500, {"error": "internal_error", "message": f"{type(inner).__name__}: {inner}"})
