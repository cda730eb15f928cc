"""What the tests, the benchmark and the demo share to start the application as ``make run`` does:
its environment (``config/serve.env``) and a free local port. Nothing here is used by the deployments."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterator, MutableMapping

from dotenv import dotenv_values

from serve_app.core.paths import PROJECT_ROOT
from serve_app.launch import Proc, descendants, running

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
    """Ports of its own for what Ray Serve binds at fixed numbers on every node, so that a second Ray session on
    one machine (a test run beside `make run`) starts, and answers its own calls: HAProxy's Prometheus endpoint
    (9101) and stats page (8404), the fallback proxy's HTTP and gRPC ports (8500, 9500), and the ranges the
    ingress replicas' own servers take their ports from (HTTP 30000-31000, gRPC 40000-41000). Ray 2.60 asks
    those gRPC servers for ``("grpc.so_reuseport", "0")``, a string, which grpc ignores: two sessions on one
    port do not fail, the kernel splits the connections between their apps, and a call reaches the other
    session's ("Application 'demo' not found"). Each session takes a block of 100 ports of
    each range, at random, beside the defaults. The mode and everything else stay as config/serve.env sets."""
    http, grpc = random.randrange(31000, 32700, 100), random.randrange(41000, 50000, 100)
    return {
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 99),
    }


FREE_PORTS = range(20000, 30000)
"""Where ``free_port`` looks: above the ports Ray's worker processes take (10002-19999), below those of
Serve's direct ingress (30000-31000) and the kernel's ephemeral range (32768 and up on Linux)."""
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that nothing listens on now, from ``FREE_PORTS``.

    A port the kernel picks (bind to port 0) lies in its ephemeral range, where every outgoing connection
    and every part of Ray that binds port 0 also gets its port: between the moment it is picked and the
    moment a server binds it, one of them can take it (seen: HAProxy's metrics port, taken while Ray
    started, and HAProxy exited). In ``FREE_PORTS`` nobody is handed a port."""
    for _ in range(500):
        port = random.choice(FREE_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface, as HAProxy and the proxies bind
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {FREE_PORTS}")


def _haproxies(root: int | None = None) -> list[Proc]:
    return [p for p in descendants(root or os.getpid()) if p.name == "haproxy"]


def haproxy_processes(root: int | None = None) -> list[int]:
    """The HAProxy processes below ``root`` (this process by default) in the process tree."""
    return [p.pid for p in _haproxies(root)]


def stop_processes(procs: list[Proc], wait_s: float = 5.0) -> None:
    """SIGTERM each of ``procs`` still running (the same PID with the same start time: a PID can be reused),
    then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in filter(running, procs):
            with contextlib.suppress(OSError):
                os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while any(map(running, procs)) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def no_haproxy_left(root: int | None = None) -> Iterator[None]:
    """Around what shuts down a Ray instance that ``root`` (this process by default) started: stops the
    HAProxy processes it leaves running. Ray Serve starts HAProxy from an actor and stops it in its own
    shutdown; that shutdown first waits out the ingress replicas' drain (30 s), longer than Serve's shutdown
    call waits, so Ray kills the actor and HAProxy is left behind. The processes stopped are those found below
    ``root`` when the block starts and when it ends (Serve's graceful reloads start new ones meanwhile):
    processes this session started, each known by its PID and start time."""
    procs = _haproxies(root)
    try:
        yield
    finally:
        stop_processes(procs + [p for p in _haproxies(root) if p not in procs])
