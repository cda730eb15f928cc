"""ASGI middleware of the ingress: the API key and the body-size limit, before any route runs.

Both read their settings from ``app.state`` (set when the ingress replica
starts), so they apply to every route, the OpenAPI docs included.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.ingress.http_errors import PayloadTooLarge, error_body, route_path

# Routes that answer without an API key: liveness and readiness probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


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


class ApiKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route but the health probes, when a key is configured."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key: bytes | None = getattr(scope["app"].state, "api_key", None) if scope["type"] == "http" else None
        if key is None or route_path(scope).rstrip("/") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key):
            return await self.app(scope, receive, send)
        await _send_json(
            send,
            scope,
            401,
            {"error": "unauthorized", "message": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
            [(b"www-authenticate", b"Bearer")],
        )


class BodyLimitMiddleware:
    """413 for a body over ``app.state.max_body_bytes``: by its Content-Length before reading it,
    or while it streams in when it has none."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit: int | None = getattr(scope["app"].state, "max_body_bytes", None) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(limit)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, scope, 413, too_large.body())

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise too_large
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:  # where no exception handler of the app caught it
            if not started:
                await _send_json(send, scope, 413, too_large.body())
