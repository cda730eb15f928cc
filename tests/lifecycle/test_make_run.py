"""`make run` stops whole and starts again (issue 23, point 1), and is closed by default (point 2).

The tests run in this order and share the `make run`s: the first start serves the two tests of what it
listens on, TERM to make's PID stops it, the second start is the check that it starts again (and answers)
and TERM to the group stops it, the third start is stopped by HUP to the group. Every stop is checked at
the moment make returns: by then, no process of make's session runs, nothing listens on the app's ports,
and the PID file is gone (so the next `make run` can start at once, and did).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from serve_app import launch
from serve_app.launch import _bindable, ports
from tests.helpers import wait_for
from tests.lifecycle.conftest import APP_ADDRESS, MakeRun, Node

pytestmark = pytest.mark.lifecycle

STALE = "left running"  # the launcher's line when it stops what an earlier run left behind


def running(make_runs: list[MakeRun], node: Node, config: Path, tmp_path_factory) -> MakeRun:
    """The `make run` of this session that is up, or a new one, once it answers."""
    if make_runs and make_runs[-1].proc.poll() is None:
        return make_runs[-1]
    log = tmp_path_factory.getbasetemp() / f"make-run-{len(make_runs) + 1}.log"
    run = MakeRun(node, config, log)
    make_runs.append(run)
    run.wait_answers()
    assert STALE not in run.output(), "the stop before this start left something running"
    return run


def _socket_owners(pids: list[int]) -> dict[int, int]:
    """Socket inode -> PID, for the sockets these processes hold."""
    owners = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners[int(link[8:-1])] = pid
    return owners


def _listening(run: MakeRun) -> list[dict]:
    """The listening TCP sockets of the app's processes: address, port, and the PID that holds it."""
    session = dict(run.session())
    owners = _socket_owners(list(session))
    table = run.node.probe("listening")  # in the app's network namespace
    held = [(s, owners[s["inode"]]) for s in table if s["inode"] in owners]
    return [{**s, "pid": pid, "name": session[pid]} for s, pid in held]


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback or address.startswith("::ffff:127.")


def check_stopped(run: MakeRun, sig: signal.Signals, seconds: float) -> None:
    """What must hold the moment make has returned: nothing of its session runs, no port of the app is
    held, no PID file is left; the launcher said once that it stopped."""
    left = run.session()
    assert left == [], f"still running after make returned from {sig.name}: {left}\n{run.output()[-3000:]}"
    if run.node.netns is not None:
        assert run.node.probe("listening") == [], "something still listens in the app's namespace"
    else:
        config = yaml.safe_load(run.config.read_text())
        held = [p for p in ports(config, run.env) if not _bindable(p)]
        assert held == [], f"ports still held after {sig.name}: {held}"
    assert not run.pid_file.exists()
    assert run.output().count("launch: stopped in") == 1, run.output()[-3000:]
    print(f"\nlifecycle: make run stopped by {sig.name} in {seconds:.1f} s")


# -- point 2: closed by default -----------------------------------------------------------------------


def test_the_pid_file_records_every_process_that_holds_a_port(make_runs, node, config, tmp_path_factory):
    # What lets the next `make run` clear what a killed one left: every process that listens, HAProxy
    # among them, is in the PID file with its start time (within the launcher's RECORD_S of starting).
    run = running(make_runs, node, config, tmp_path_factory)
    fixed = {p.port for p in ports(yaml.safe_load(config.read_text()), run.env)}
    seen: dict = {}

    def every_port_held_by_a_running_process() -> bool:
        # One look at the sockets and their processes. Serve reloads HAProxy when its replicas change: the
        # new process takes the sockets and the old one exits, so a look taken across a reload is retaken.
        listening = _listening(run)
        seen["holders"] = {launch.current(s["pid"]) for s in listening}
        seen["ports"] = {s["port"] for s in listening}
        return fixed <= seen["ports"] and None not in seen["holders"]  # HTTP, gRPC, HAProxy's stats and metrics

    assert wait_for(every_port_held_by_a_running_process, timeout=30), seen
    holders = seen["holders"]
    assert "haproxy" in {p.name for p in holders}

    def unrecorded() -> list[launch.Proc]:
        recorded = launch.read_pid_file(run.pid_file)
        keys = {p.key() for p in recorded[1]} if recorded else set()
        return [p for p in holders if p.key() not in keys and launch.running(p)]

    assert wait_for(lambda: not unrecorded(), timeout=10 * launch.RECORD_S), unrecorded()


def test_nothing_of_the_app_answers_on_a_non_loopback_address(make_runs, node, config, tmp_path_factory):
    if node.netns is None:
        pytest.skip("needs root: a network namespace to probe the app from another address")
    run = running(make_runs, node, config, tmp_path_factory)
    listening = _listening(run)
    options = yaml.safe_load(config.read_text())
    http_port, grpc_port = options["http_options"]["port"], options["grpc_options"]["port"]
    by_port = {}
    for s in listening:
        by_port.setdefault(s["port"], []).append(s)
    # The config's own ports: on the loopback only (HAProxy's HTTP and gRPC entries).
    for port in (http_port, grpc_port):
        assert by_port.get(port) and all(_loopback(s["address"]) for s in by_port[port]), by_port.get(port)
    # From the peer namespace, every port any of the app's processes listens on.
    scanned = {r["port"]: r for r in node.probe("scan", APP_ADDRESS, *map(str, sorted(by_port)), peer=True)}
    reachable = {port for port, r in scanned.items() if r["tcp"] == "open"}
    assert reachable <= {p for p, socks in by_port.items() if not all(_loopback(s["address"]) for s in socks)}
    assert {http_port, grpc_port}.isdisjoint(reachable)
    # Nothing reachable serves the app: no answer to GET /models or POST /predict, no ModelInfer.
    served = {p: r for p, r in scanned.items() if 200 in (r.get("models"), r.get("predict")) or r.get("infer") == "OK"}
    assert served == {}, scanned
    # What Ray binds to every interface whatever http_options.host says (docs/operations.md): HAProxy's stats
    # page and metrics, and the ingress replica's own gRPC server, which HAProxy's gRPC entry forwards to
    # and where the app itself refuses a call from another address.
    haproxy = {p for p, socks in by_port.items() if any(s["name"] == "haproxy" for s in socks)}
    assert haproxy & reachable == {8404, 9101}
    ingress_grpc = _haproxy_grpc_targets(listening)
    assert ingress_grpc and ingress_grpc <= reachable, (ingress_grpc, sorted(reachable))
    for port in ingress_grpc:
        assert (scanned[port]["infer"], "auth is off" in scanned[port]["details"]) == ("PERMISSION_DENIED", True)


def _haproxy_grpc_targets(listening: list[dict]) -> set[int]:
    """The ports of the ingress replicas' gRPC servers, as HAProxy's config names them (``server
    SERVE_REPLICA_<app>-Ingress-<id> 127.0.0.1:<port> proto h2``)."""
    ports: set[int] = set()

    def read() -> bool:
        for pid in {s["pid"] for s in listening if s["name"] == "haproxy"}:
            with contextlib.suppress(OSError):  # an HAProxy replaced by a reload meanwhile
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                config = Path(argv[argv.index(b"-f") + 1].decode()).read_text()
                servers = re.findall(r"^\s*server SERVE_REPLICA_\S+ \S+:(\d+) proto h2", config, re.M)
                ports.update(map(int, servers))
        return bool(ports)

    wait_for(read, interval=0.5)  # HAProxy's gRPC backend may follow its HTTP one by a moment
    return ports


# -- point 1: a stopped app starts again -----------------------------------------------------------------


def test_term_to_makes_pid_alone_stops_everything_before_make_returns(make_runs, node, config, tmp_path_factory):
    # As `kill` and `docker stop` send it: make passes SIGTERM on to its child, the launcher.
    run = running(make_runs, node, config, tmp_path_factory)
    check_stopped(run, signal.SIGTERM, run.stop(signal.SIGTERM, group=False))


def test_it_starts_again_and_term_to_the_group_stops_everything(make_runs, node, config, tmp_path_factory):
    # As systemd stops a service: SIGTERM to every process of make's group (make and the launcher; serve run
    # has a group of its own, which the launcher signals).
    run = running(make_runs, node, config, tmp_path_factory)  # the start after the stop above: it answers
    check_stopped(run, signal.SIGTERM, run.stop(signal.SIGTERM, group=True))


def test_hup_to_the_group_stops_everything(make_runs, node, config, tmp_path_factory):
    # As a closed terminal stops its jobs.
    run = running(make_runs, node, config, tmp_path_factory)
    check_stopped(run, signal.SIGHUP, run.stop(signal.SIGHUP, group=True))
