"""ASGI middleware of the ingress: auth, and the body's size limit and read deadline, before any route runs.

Both read their settings from ``app.state`` (set when the ingress replica starts), so they apply to every
route, the OpenAPI docs included.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.ingress.auth import OPEN_PATHS, authorization_of, authorize, is_admin_path
from deployments.ingress.http_errors import BodyError, BodyTimeout, PayloadTooLarge, error_body, route_path
from serve_app.core.config import Keys
from serve_app.core.errors import MalformedRequest, ServeAppError, Unauthorized

# C0 control characters and DEL. No route's path has one, and a path that does is not checked as the router
# reads it: Starlette's route patterns end in ``$``, which matches before a final newline, so
# ``/models/m/load%0A`` reaches the load route while a full match of the admin routes misses it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def _send_json(
    send: Send, scope: Scope, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(error_body(scope, body)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class AuthMiddleware:
    """``Authorization: Bearer <key>`` on every route but the health probes, and the admin key on load and
    unload, when auth is on (``app.state.keys``). First, whatever the auth mode, a path with a control
    character is 400: the admin check must see the path as the router will."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL.search(scope.get("path", "")):
            refused = MalformedRequest("the request path has a control character (a percent-encoded %00 to %1F or %7F)")
            return await _send_json(send, scope, refused.status_code, refused.body())
        keys: Keys | None = getattr(scope["app"].state, "keys", None) if scope["type"] == "http" else None
        path = route_path(scope).rstrip("/") if keys is not None and keys.on else ""
        if not path or path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            authorization = authorization_of(scope.get("headers", []), b"authorization")
            authorize(keys, authorization, admin=is_admin_path(path))
        except ServeAppError as e:
            headers = [(b"www-authenticate", b"Bearer")] if isinstance(e, Unauthorized) else []
            return await _send_json(send, scope, e.status_code, e.body(), headers)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``app.state.max_body_bytes``: by its Content-Length before reading it, or while it
    streams in when it has none. 408, and the connection closed, for a body not received whole within
    ``app.state.body_timeout_s`` of the request reaching the app: a request holds one of the ingress replica's
    ``max_ongoing_requests`` while its body arrives, and a client that sends a byte every few seconds would
    hold it for as long as it likes. (Headers: in the mode make run starts, HAProxy reads them whole before
    the app sees the request, and its ``timeout client`` bounds each wait; Ray 2.60 sets no
    ``timeout http-request``.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int | None = getattr(scope["app"].state, "max_body_bytes", None) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        timeout_s: float | None = getattr(scope["app"].state, "body_timeout_s", None)
        too_large = PayloadTooLarge(limit)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, scope, 413, too_large.body())

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s if timeout_s is not None else None
        received = 0
        body_done = False
        started = False

        async def next_message() -> Message:
            if body_done or deadline is None:  # after the body: waits for a disconnect, unbounded
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    return await receive()
            except TimeoutError:
                raise BodyTimeout(timeout_s) from None

        async def limited_receive() -> Message:
            nonlocal received, body_done
            msg = await next_message()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise too_large
                body_done = not msg.get("more_body", False)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyError as e:  # where no exception handler of the app caught it
            if not started:
                headers = [(k.encode(), v.encode()) for k, v in (e.headers or {}).items()]
                await _send_json(send, scope, e.status_code, e.body(), headers)
