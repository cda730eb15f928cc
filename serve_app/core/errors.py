"""The error types of the application, without any HTTP framework.

Each error carries the status a protocol adapter answers with (``status_code``, an HTTP status), a short
machine-readable ``error`` and a message for people. The mapping to HTTP responses lives in
``deployments.ingress.http_errors``, the mapping to gRPC status codes in
``deployments.ingress.protocols.v2_grpc``. ``LimitExceeded`` marks the errors of a request over one of
the app's limits: HTTP answers them with their own status, gRPC with RESOURCE_EXHAUSTED.

Errors raised in a worker replica travel back through Ray: they pickle with their details intact, and
``unwrap`` recovers them from Ray's wrapper.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[ServeAppError], message: str, details: dict[str, Any]) -> ServeAppError:
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
    """The request is well-formed but its content does not fit the model."""

    status_code = 422
    error = "invalid_input"


class BadImage(ServeAppError):
    """The bytes given as an image cannot be decoded as one."""

    status_code = 400
    error = "bad_image"


class ForbiddenPath(ServeAppError):
    status_code = 403
    error = "forbidden_path"


class Unauthorized(ServeAppError):
    """No API key, or a wrong one, while auth is on."""

    status_code = 401
    error = "unauthorized"


class AdminKeyRequired(ServeAppError):
    """The API key is right, but the call (loading or unloading a model) needs the admin key."""

    status_code = 403
    error = "admin_key_required"


class LoopbackOnly(ServeAppError):
    """A call from another address while auth is off: with auth off, the app answers callers on this
    machine's loopback only (deployments.ingress.auth.require_loopback)."""

    status_code = 403
    error = "loopback_only"


class LimitExceeded(ServeAppError):
    """The request is over one of the app's limits (body size, list length, image bytes or pixels)."""


class PayloadTooLarge(LimitExceeded):
    """A request body (HTTP) or message (gRPC) over ``max_body_bytes``."""

    status_code = 413
    error = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes", limit=limit)


class InputOverLimit(LimitExceeded, InvalidInput):
    """More inputs than ``max_list_items``, or an image over ``max_image_bytes``."""


class ImageOverLimit(LimitExceeded, BadImage):
    """An image whose header claims more pixels than ``max_image_pixels``."""


class ModelNotFound(ServeAppError):
    status_code = 404
    error = "model_not_found"

    def __init__(self, model_id: str, known: list[str]) -> None:
        super().__init__(
            f"Unknown model {model_id!r}. Known models: {', '.join(known)}",
            model_id=model_id,
            known_models=known,
        )


class ModelChanged(ServeAppError):
    """The model's registry entry changed task while the request was on its way: its inputs were decoded for
    the task it had. Sent again, the request reaches the model as it is now."""

    status_code = 409
    error = "model_changed"


class ModelUnavailable(ServeAppError):
    """The model is registered but could not be loaded or run (missing files, crash)."""

    status_code = 503
    error = "model_unavailable"


class RequestTimeout(ServeAppError):
    status_code = 504
    error = "timeout"


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as the dotted field name a client sees (``inputs.0.datatype``);
    the ``body`` prefix FastAPI adds is left out."""
    return ".".join(str(part) for part in loc if part != "body") or "body"


def unwrap(exc: BaseException) -> BaseException:
    """The application error behind a Ray wrapper (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while not isinstance(exc, ServeAppError) and getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc
