"""`make run` itself, started as a terminal starts it and stopped as `kill`, systemd and a closed terminal
stop it: a pytest session of its own (`make test` runs it after the others), since each start is a new
Ray instance, started by `make run`.

Every `make run` here runs in a session of its own (``start_new_session=True``): make leads it, so every
process it starts carries make's PID as its session id (Ray's processes and HAProxy included, whatever
process group or parent they end up with), and "nothing left" can be checked without knowing any name.

The config is a copy of serve_config.yaml with a registry of one tiny model and one worker replica, so
that a start is cheap; where it listens, its auth, and the environment (config/serve.env: throughput-
optimised mode with HAProxy) are the shipped ones. As root (CI), each `make run` runs in a network
namespace of this session's own, on the config's own ports (8000, 9000, and HAProxy's 8404 and 9101: no
one else's can be there), with a peer namespace on the other end of a veth pair to probe it "from the
network"; nothing is added to the machine's own network namespace. Otherwise it runs here, on free ports,
and the test of what answers from the network is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serve_app.core.paths import PROJECT_ROOT
from serve_app.devtools import free_port

pytestmark = pytest.mark.lifecycle


def pytest_configure(config) -> None:
    # Registered here rather than in pyproject.toml: an edit there makes `make` reinstall the project.
    config.addinivalue_line("markers", "lifecycle: starts and stops `make run` itself, each start a Ray of its own")


APP_ADDRESS, PEER_ADDRESS = "10.214.9.1", "10.214.9.2"  # exist only inside this session's namespaces
STOPPED_S = 180.0
"""How long a stopped `make run` may take to exit before the test fails: a bound on a hang, not a
measurement (a clean stop takes seconds)."""
STARTED_S = 300.0
"""Likewise, how long a `make run` may take to answer."""


class Node:
    """Where `make run` runs: a network namespace (root), or this machine's own network."""

    def __init__(self, netns: str | None, peer: str | None) -> None:
        self.netns, self.peer = netns, peer

    def command(self, argv: list[str], peer: bool = False) -> list[str]:
        ns = self.peer if peer else self.netns
        return ["ip", "netns", "exec", ns, *argv] if ns else argv

    def probe(self, *args: str, peer: bool = False, timeout: float = STARTED_S) -> object:
        """Run tests/lifecycle/probe.py in the app's namespace (or the peer's); its JSON answer."""
        argv = self.command([sys.executable, "-m", "tests.lifecycle.probe", *args], peer=peer)
        out = subprocess.run(argv, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)


def _env() -> dict[str, str]:
    """This session's environment (config/serve.env, set by tests/conftest.py), with the project on the
    path (the code of this checkout in every Ray process)."""
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield Node(None, None)
        return
    app, peer = f"mmsl{os.getpid()}a", f"mmsl{os.getpid()}p"
    try:
        _ip("netns", "add", app)
        _ip("netns", "add", peer)
        for ns in (app, peer):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", app, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer)
        for ns, address in ((app, APP_ADDRESS), (peer, PEER_ADDRESS)):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield Node(app, peer)
    finally:
        for ns in (app, peer):  # whatever still runs in them was started by this session
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    from demo.tiny_models import build_text_model, write_registry

    base = tmp_path_factory.mktemp("tiny")
    alpha = build_text_model(base / "alpha", "alpha")
    return write_registry(base / "registry.json", {"alpha": ("text-classification", alpha)})


def write_config(path: Path, registry: Path, node: Node) -> Path:
    """serve_config.yaml with the tiny registry and one worker replica; on this machine's network, on free
    ports."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    if node.netns is None:
        config["http_options"]["port"], config["grpc_options"]["port"] = free_port(), free_port()
    args = config["applications"][0]["args"]
    args["registry_path"] = str(registry)
    args["model_roots"] = [str(registry.parent)]  # the tiny model's folder, besides the project's models/
    # One worker replica; the shipped memory setting, so that the app runs as make run starts it.
    args["worker"] = {
        "num_replicas": 1,
        "num_cpus": 0.5,
        "torch_threads": 1,
        "memory_bytes": args["worker"]["memory_bytes"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def config(tmp_path_factory, registry, node) -> Path:
    return write_config(tmp_path_factory.mktemp("app") / "serve_config.yaml", registry, node)


class MakeRun:
    """One `make run SERVE_CONFIG=<config>` in a session of its own, its output in ``log``."""

    def __init__(self, node: Node, config: Path, log: Path) -> None:
        self.node, self.config, self.log = node, config, log
        env = _env()
        if node.netns is not None:  # HAProxy's own ports: the namespace is this session's alone
            for var in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
                env.pop(var, None)
        self.env = env
        # `-o models`: the demo models are not this session's subject, and `make test` has just built them
        # (checking that they are up to date costs a torch import, about 6 s a start).
        make = ["make", "--no-print-directory", "-o", "models", "-C", str(PROJECT_ROOT)]
        make += ["run", f"SERVE_CONFIG={config}"]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                node.command(make),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # As a terminal starts it: SIGHUP at its default, even where this session ignores it (run
                # under nohup), which make and the launcher would keep ignoring, as they do for nohup make run.
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
            )
        self.pid = self.proc.pid  # `ip netns exec` execs make: this is make's PID and its session's id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{yaml.safe_load(self.config.read_text())['http_options']['port']}"

    @property
    def pid_file(self) -> Path:
        return self.config.parent / ".run" / f"{self.config.name}.pid"

    def output(self) -> str:
        return self.log.read_text()

    def wait_answers(self) -> None:
        got = self.node.probe("answers", self.url, "--while-pid", str(self.pid), "--timeout", str(STARTED_S))
        assert got == {"status": 200}, f"make run did not answer ({got}):\n{self.output()[-3000:]}"

    def session(self) -> list[tuple[int, str]]:
        """The processes of make's session still running (PID, name), make included."""
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == self.pid and fields[0] not in ("Z", "X"):
                found.append((int(entry), name))
        return found

    def stop(self, sig: signal.Signals, group: bool) -> float:
        """Send ``sig`` to make's PID alone, or to its whole process group; wait for make to exit. Returns
        the seconds it took (reported, never asserted)."""
        started = time.monotonic()
        (os.killpg if group else os.kill)(self.pid, sig)
        try:
            self.proc.wait(timeout=STOPPED_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make run still runs {STOPPED_S:.0f} s after {sig.name}:\n{self.output()[-3000:]}")
        return time.monotonic() - started

    def kill_everything(self) -> None:
        """After a failed test: SIGKILL whatever is left of this make run's session."""
        for pid, _ in self.session():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def make_runs(node, tmp_path_factory) -> Iterator[list[MakeRun]]:
    """Every `make run` of the session, in order; at the end, nothing of any of them is left running."""
    check = subprocess.run(["make", "-n", "-C", str(PROJECT_ROOT), "run"], env=_env(), capture_output=True, text=True)
    if "pip install" in check.stdout:
        pytest.fail("`make run` would install the project first: run `make install` before these tests")
    runs: list[MakeRun] = []
    yield runs
    for run in runs:
        if run.proc.poll() is None or run.session():
            run.kill_everything()
