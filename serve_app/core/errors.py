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

import json
import re
from collections.abc import Callable
from typing import Any

ECHO_CHARS = 80
"""The most characters of a client's own input (a model id, a tensor name) an error message quotes."""
MESSAGE_CHARS = 200
"""The most characters of a foreign exception's message (a decoder's, a model's) an error message carries."""

_OBJECT = re.compile(r"\s*<[^<>]{0,200} at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def echo(text: object, quote: bool = True) -> str:
    """A client's input for an error message: at most ECHO_CHARS characters of it, as ``repr`` writes them
    (control and invisible characters escaped), in quotes unless ``quote`` is false."""
    s = str(text)
    s = s if len(s) <= ECHO_CHARS else s[:ECHO_CHARS] + "..."
    return repr(s) if quote else repr(s)[1:-1]


def bounded(text: str, redact: Callable[[str], str] | None = None) -> str:
    """Text from code outside this app, as a client may read it: ``redact`` applied first (server paths), then
    object addresses removed (Pillow's "<_io.BytesIO object at 0x...>"), on one line, at most MESSAGE_CHARS
    characters."""
    text = redact(text) if redact is not None else text
    text = " ".join(_ADDRESS.sub("0x...", _OBJECT.sub("", text)).split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


def error_text(e: BaseException, redact: Callable[[str], str] | None = None) -> str:
    """An exception raised by code outside this app (a decoder, a model runtime, a library) as a client may
    read it: its type and its message, ``bounded``. Its whole text goes to the log, not to the client."""
    message = bounded(str(e), redact)
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


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

    @property
    def internal(self) -> bool:
        """Whether it has no status of its own: the base error's 500, which blames the app. Raised by a model's
        or a task's code, it is that code's failure instead (a 503 naming it)."""
        return self.status_code == ServeAppError.status_code

    def body(self) -> dict[str, Any]:
        """The error's JSON body: its kind, message and details. A detail JSON cannot hold (a numpy number, a NaN,
        an object: a runtime's own error may carry any) is given as its text, bounded."""
        return {"error": self.error, "message": self.message, **{k: _json_safe(v) for k, v in self.details.items()}}


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return bounded(str(value))
    return value


class InvalidInput(ServeAppError):
    """The request is well-formed but its content does not fit the model."""

    status_code = 422
    error = "invalid_input"


class MalformedRequest(InvalidInput):
    """The request cannot be read as what it claims to be: a body that is not JSON (``NaN`` and ``Infinity``
    included), a message that is not the protocol's, or parts that disagree with one another (a tensor's
    shape and its data, a stated length and the bytes sent). HTTP 400, where a well-formed request that does
    not fit the model is 422; gRPC INVALID_ARGUMENT, as for any bad input."""

    status_code = 400
    error = "malformed_request"


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
        # The id is the client's, up to a body's size: quoted in part only (a registry id has at most 64
        # characters, so no known id is ever cut).
        shown = model_id if len(model_id) <= ECHO_CHARS else model_id[:ECHO_CHARS] + "..."
        super().__init__(f"Unknown model {echo(model_id)}. Known models: {', '.join(known)}", model_id=shown)
        self.details["known_models"] = known


class ModelVersionNotFound(ServeAppError):
    """A version of a model other than the one it has (the Open Inference Protocol's ``versions/{version}``):
    each model is served at one version, as its metadata lists it."""

    status_code = 404
    error = "model_version_not_found"

    def __init__(self, model_id: str, version: str, versions: list[str]) -> None:
        super().__init__(
            f"Model {echo(model_id)} has no version {echo(version)}; its versions: {', '.join(versions)}",
            model_id=model_id,
        )


class ModelChanged(ServeAppError):
    """The model's registry entry changed task while the request was on its way: its inputs were decoded for
    the task it had. Sent again, the request reaches the model as it is now."""

    status_code = 409
    error = "model_changed"


class ModelUnavailable(ServeAppError):
    """The model is registered but could not be loaded or run (missing files, crash). ``retry_after_s``, when
    set, is how long the app will not try the model again: HTTP sends it as ``Retry-After``, gRPC as
    ``retry-after`` trailing metadata."""

    status_code = 503
    error = "model_unavailable"


class ModelFailed(ModelUnavailable):
    """The model's own code failed on a request: its runtime raised (other than one of this app's errors) or
    answered outside its task's contract. A 503 as ``ModelUnavailable``; the worker counts it for the model
    (``GET /models``: ``request_failures``)."""


class RequestBodyTimeout(ServeAppError):
    """The client did not send its whole request body within ``body_timeout_s``."""

    status_code = 408
    error = "request_timeout"


def retry_after_s(exc: BaseException) -> int | None:
    """The whole seconds a client should wait before it sends the request again, if the error says (at least 1)."""
    seconds = exc.details.get("retry_after_s") if isinstance(exc, ServeAppError) else None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return None
    return max(1, int(-(-seconds // 1)))


class RequestTimeout(ServeAppError):
    status_code = 504
    error = "timeout"


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as the dotted field name a client sees (``inputs.0.datatype``);
    the ``body`` prefix FastAPI adds is left out."""
    return ".".join(str(part) for part in loc if part != "body") or "body"


def first_invalid(error: Any, within: str = "") -> InvalidInput:
    """A pydantic ``ValidationError`` as the client's 422: its first problem, at its field (under ``within``,
    the part of the request the validated value came from)."""
    first = error.errors(include_url=False)[0]
    where = f"{within}.{field_path(first['loc'])}" if within else field_path(first["loc"])
    return InvalidInput(f"{where}: {first['msg']}", field=where)


def unwrap(exc: BaseException) -> BaseException:
    """The application error behind a Ray wrapper (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while not isinstance(exc, ServeAppError) and getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc
