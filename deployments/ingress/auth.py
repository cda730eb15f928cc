"""Who may call what: the one check behind every protocol (the HTTP middleware, the gRPC adapter).

With auth on, every call but the health probes needs ``Bearer <API key or admin key>``, and the admin
calls (loading and unloading models) need the admin key. Keys are compared in constant time.

With auth off, the app is for this machine alone: it starts only on a loopback address (the builder's
``listen_refusal``), and a gRPC call from any other address is refused (``require_loopback``). Ray Serve
binds the HTTP servers to that address, but not every gRPC server: the ingress replicas' own gRPC servers
(direct ingress) and the fallback proxy's listen on every interface, whatever ``http_options.host`` says.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import unquote

from serve_app.core.config import Keys, is_loopback
from serve_app.core.errors import AdminKeyRequired, LoopbackOnly, MalformedRequest, Unauthorized

# HTTP routes that answer without a key: liveness and readiness probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})

# HTTP routes that change what the worker replicas hold: the admin key's.
_ADMIN_PATH = re.compile(r"(?:/v2/repository)?/models/[^/]+/(?:load|unload)/?")


# gRPC methods of inference.GRPCInferenceService, likewise: the health probes open, load and unload admin.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})
ADMIN_RPCS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


def is_admin_path(path: str) -> bool:
    return _ADMIN_PATH.fullmatch(path) is not None


K = TypeVar("K", str, bytes)
V = TypeVar("V", str, bytes)


def authorization_of(pairs: Iterable[tuple[K, V]], name: K) -> V | None:
    """The one ``Authorization`` header of an HTTP request (``name`` b"authorization"), or the one
    ``authorization`` metadata of a gRPC call; MalformedRequest for two or more: which of them a proxy in
    front and the app would each read is not for the client to choose."""
    found = [value for key, value in pairs if key == name]
    if len(found) > 1:
        raise MalformedRequest(f"the request has {len(found)} Authorization headers: send one")
    return found[0] if found else None


def _bearer(authorization: str | bytes | None) -> bytes | None:
    if not authorization:
        return None
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", errors="replace")
    scheme, _, token = authorization.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def authorize(keys: Keys, authorization: str | bytes | None, admin: bool = False) -> None:
    """Raise Unauthorized (no key, a wrong one) or AdminKeyRequired (the API key on an admin call)."""
    if not keys.on:
        return
    token = _bearer(authorization)
    if token is not None and hmac.compare_digest(token, keys.admin):
        return
    if token is not None and hmac.compare_digest(token, keys.api):
        if not admin:
            return
        raise AdminKeyRequired(
            "loading and unloading models needs the admin key: send 'Authorization: Bearer <admin key>'"
        )
    raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


def peer_host(peer: str) -> str | None:
    """The address in a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``); None for a
    Unix socket (``unix:...``), which only this machine reaches."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "unix":
        return None
    host, _, _ = rest.rpartition(":")
    return host.strip("[]")


def require_loopback(keys: Keys, peer: str) -> None:
    """With auth off, raise LoopbackOnly for a gRPC call from anywhere but this machine's loopback."""
    if keys.on:
        return
    host = peer_host(peer)
    if host is not None and not is_loopback(host):
        raise LoopbackOnly(
            "auth is off (auth.mode: off), so this app answers callers on its own machine only: "
            "turn auth on (auth.mode: api_key) to serve other machines"
        )
