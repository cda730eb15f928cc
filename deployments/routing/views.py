"""The worker replicas as this process's router sees them.

Serve creates the router inside the caller's process (the ingress replica) and loads its class by value,
so the router cannot be reached through its own module: it registers itself here instead, and the
ingress reads the replicas (their ids, nodes, pushed model ids and their own reported stats) from it.
"""

from __future__ import annotations

import weakref
from typing import Any

_routers: dict[tuple[str, str], weakref.ReferenceType[Any]] = {}


def register(app_name: str, deployment_name: str, router: Any) -> None:
    _routers[(app_name, deployment_name)] = weakref.ref(router)


def view_of(app_name: str, deployment_name: str) -> Any | None:
    """The router of this process for a deployment, or None before its handle has routed anything."""
    ref = _routers.get((app_name, deployment_name))
    return ref() if ref is not None else None
