"""What the tests, the benchmark and the demo share to start the application as ``make run`` does:
its environment (``config/serve.env``) and a free local port. Nothing here is used by the deployments."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from dotenv import dotenv_values

from serve_app.core.paths import PROJECT_ROOT

ENV_FILE = PROJECT_ROOT / "config" / "serve.env"


def serve_env() -> dict[str, str]:
    """The environment ``make run`` starts Ray Serve with, as written in config/serve.env."""
    return {k: v for k, v in dotenv_values(ENV_FILE).items() if v is not None}


def apply_serve_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set config/serve.env's variables where the environment does not set them already, as ``make run``
    does; returns the variables as set. Call it before Ray starts: Ray's processes inherit it."""
    for key, value in serve_env().items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in serve_env()}


def own_fixed_ports() -> dict[str, str]:
    """Free ports for what Ray Serve binds at fixed numbers on every node (HAProxy's Prometheus endpoint,
    9101, and stats page, 8404), so that a second Ray session on one machine (a test run beside `make run`)
    can start. The mode and everything else stay as config/serve.env sets them."""
    return {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
