"""The integration tests run the app in the mode `make run` starts (config/serve.env): read from the running
app itself, not from the pytest process. tests/conftest.py sets config/serve.env's variables only where the
environment does not set them already (as `make run` does), so a shell that presets another mode would
otherwise go unnoticed: every replica's environment has config/serve.env's values, with Ray Serve's
throughput-optimised mode and HAProxy on, and an HAProxy below this session's Ray holds Serve's HTTP and
gRPC ports."""

import os
import time

import pytest

from serve_app.devtools import haproxy_processes, serve_env
from serve_app.launch import listeners
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

SHIPPED_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def test_every_replica_runs_in_the_environment_of_config_serve_env(demo_url):
    from serve_app.core import ray_internals

    assert {k: serve_env()[k] for k in SHIPPED_MODE} == SHIPPED_MODE  # what `make run` starts
    apps = ray_internals.serve_instance_details()["applications"]
    pids = {
        (app, deployment, r["replica_id"]): r["pid"]
        for app in apps
        for deployment, d in apps[app]["deployments"].items()
        for r in d["replicas"]
        if r["state"] == "RUNNING"
    }
    assert {deployment for app, deployment, _ in pids if app == "demo"} == {"Ingress", "ModelWorker", "RegistryCheck"}
    for replica, pid in pids.items():
        environ = _environ(pid)
        differ = {k: (environ.get(k), v) for k, v in serve_env().items() if environ.get(k) != v}
        assert differ == {}, f"replica {replica} (PID {pid}) runs with (its value, config/serve.env's): {differ}"


def test_haproxy_below_this_sessions_ray_holds_serves_http_and_grpc_ports(demo_url, serve_url, grpc_target):
    assert haproxy_processes(os.getpid()), "no HAProxy runs below this session's Ray: RAY_SERVE_ENABLE_HA_PROXY is off"
    ports = {
        "HTTP": int(serve_url.rsplit(":", 1)[1]),
        "gRPC": int(grpc_target.rsplit(":", 1)[1]),
        "metrics": int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]),  # this session's own (tests/conftest.py)
        "stats": int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]),
    }
    seen: dict = {}

    def held_by_haproxy() -> bool:
        # One look at the processes and the sockets. Serve reloads HAProxy when replicas change (an app of an
        # earlier test still stopping): the new process takes the sockets, so a look across a reload is retaken.
        seen["haproxies"] = haproxies = set(haproxy_processes(os.getpid()))
        seen["holders"] = holders = {name: set(listeners(port)) for name, port in ports.items()}
        return all(pids and pids <= haproxies for pids in holders.values())

    assert wait_for(held_by_haproxy, timeout=30), seen


SILENT_CLOSED_WITHIN_S = 75
"""A connection that sends nothing is closed within this long: HAProxy's client timeout (config/serve.env, 30 s),
and the time HAProxy takes to notice it."""


def test_a_connection_that_sends_nothing_is_closed_within_a_minute(silent_connection):
    """With Ray's default client timeout (an hour), 4,200 such connections held all 4,096 that HAProxy takes,
    and no request or gRPC call was answered until they closed (docs/errors-and-limits.md)."""
    sock, opened = silent_connection
    sock.settimeout(max(0.1, opened + SILENT_CLOSED_WITHIN_S - time.monotonic()))
    answer = b""
    try:
        while chunk := sock.recv(4096):  # HAProxy may answer 408 before it closes
            answer += chunk
    except TimeoutError:
        pytest.fail(f"still open {time.monotonic() - opened:.0f}s after it was opened, having sent nothing")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
