"""``make run``'s launcher (serve_app/launch.py) without Ray: what it refuses before anything starts, and
how it stops, with a stand-in for ``serve run`` that leaves a process behind as Serve's HAProxy can (a
child of its own, in a session of its own, listening on the app's port). tests/lifecycle runs the real
``make run``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve_app import launch
from serve_app.core.paths import PROJECT_ROOT
from serve_app.devtools import free_port

BOUND_S = 60.0
"""How long a test waits for something before it fails: a bound on a hang, not a measurement."""

FAKE_SERVE = """
import os, signal, subprocess, sys, time
# serve run's stand-in: it starts a process that nothing ties to it (a session of its own, as Serve's actor
# starts HAProxy) and that listens on the app's port; it exits on SIGINT (its shutdown, which here forgets
# the listener) and dies on SIGTERM, writing down which signal came.
log = open(os.environ["FAKE_LOG"], "a", buffering=1)
listen = "import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
listen += "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", listen, os.environ["FAKE_PORT"]], start_new_session=True)
def note(name, code):
    def handler(signum, frame):
        log.write(name + "\\n")
        os._exit(code)
    return handler
signal.signal(signal.SIGINT, note("INT", 0))
signal.signal(signal.SIGTERM, note("TERM", 143))
time.sleep(600)
"""

LAUNCH = (
    "import sys; import serve_app.launch as launch; "
    "launch._serve_command = lambda config: [sys.executable, sys.argv[1]]; "
    "sys.exit(launch.main(sys.argv[2:]))"
)


class Launched:
    """``python -m serve_app.launch CONFIG`` with the stand-in for serve run, in a session of its own."""

    def __init__(self, base: Path, port: int, name: str = "launch", stderr_pipe: bool = False, **popen) -> None:
        """``stderr_pipe``: its stderr a pipe whose reader the test may close (``make run | tee``, tee gone)."""
        self.base, self.port = base, port
        self.config, self.pid_file = base / "serve_config.yaml", base / "run.pid"
        self.signals, self.stderr = base / "signals.log", base / f"{name}.err"
        fake = base / "fake_serve.py"
        fake.write_text(FAKE_SERVE)
        env = {**os.environ, "FAKE_PORT": str(port), "FAKE_LOG": str(self.signals), "RAY_SERVE_ENABLE_HA_PROXY": "0"}
        argv = [sys.executable, "-c", LAUNCH, str(fake), str(self.config), "--pid-file", str(self.pid_file)]
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=PROJECT_ROOT,
                env=env,
                stderr=subprocess.PIPE if stderr_pipe else err,
                start_new_session=True,
                **popen,
            )

    def lines(self) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if line.startswith("launch:")]

    def listener(self) -> launch.Proc:
        """The stand-in for HAProxy, once it listens and the PID file records it."""
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            holders = [p for p in map(launch.current, launch.listeners(self.port)) if p is not None]
            recorded = launch.read_pid_file(self.pid_file)
            ours = recorded is not None and recorded[0].pid == self.proc.pid  # this launcher's own record
            if holders and ours and holders[0].key() in {p.key() for p in recorded[1]}:
                return holders[0]
            time.sleep(0.05)
        raise AssertionError(f"nothing recorded listens on {self.port}: {self.stderr.read_text()}")

    def wait(self) -> int:
        return self.proc.wait(timeout=BOUND_S)


def write_config(base: Path, port: int, host: str = "127.0.0.1", auth: str = "off") -> None:
    config = {
        "http_options": {"host": host, "port": port},
        "applications": [{"name": "multimodel", "args": {"auth": {"mode": auth}}}],
    }
    (base / "serve_config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def app(tmp_path):
    port = free_port()
    write_config(tmp_path, port)
    started: list[Launched] = []

    def start(name: str = "launch", **options) -> Launched:
        started.append(Launched(tmp_path, port, name, **options))
        return started[-1]

    yield start
    for launched in started:  # after a failure: nothing of this test is left running
        if launched.proc.poll() is None:
            os.killpg(launched.proc.pid, signal.SIGKILL)
    for pid in launch.listeners(port):  # this test's port, from free_port(): what holds it is this test's
        os.kill(pid, signal.SIGKILL)


def _free(port: int) -> bool:
    return launch._bindable(launch.Port(port, "127.0.0.1", "http_options.port"))


@pytest.mark.parametrize(
    "sig, serve_run_got", [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT"), (signal.SIGQUIT, "TERM")]
)  # HUP: as TERM; SIGQUIT is Ctrl-\
def test_a_stop_signal_stops_serve_run_and_what_outlived_it_before_the_launcher_exits(app, sig, serve_run_got):
    launched = app()
    listener = launched.listener()
    os.kill(launched.proc.pid, sig)
    assert launched.wait() == 128 + sig
    # In this order: serve run got the signal once (SIGINT for its own shutdown, else SIGTERM), and by the
    # time the launcher has exited, the process serve run left behind is gone and the port is free.
    assert launched.signals.read_text().split() == [serve_run_got]
    assert not launch.running(listener) and _free(launched.port)
    assert not launched.pid_file.exists()
    assert len(launched.lines()) == 2 and launched.lines()[-1].startswith("launch: stopped in")
    assert "1 processes that outlived it (python)" in launched.lines()[-1]


def test_a_launcher_whose_stderr_reader_is_gone_still_stops_everything_it_started(app):
    """``make run | tee log``, then Ctrl-C ends tee before the launcher writes its "stopping" line: the write
    fails (EPIPE), and the launcher still stops serve run and what outlived it, and removes its PID file."""
    launched = app(stderr_pipe=True)
    listener = launched.listener()
    launched.proc.stderr.close()
    os.kill(launched.proc.pid, signal.SIGTERM)
    assert launched.wait() == 128 + signal.SIGTERM
    assert launched.signals.read_text().split() == ["TERM"]
    assert not launch.running(listener) and _free(launched.port) and not launched.pid_file.exists()


def test_a_sighup_the_launcher_was_started_ignoring_stays_ignored(app):
    """``nohup make run &``: the terminal closes (SIGHUP) and the app runs on; a later SIGTERM stops it."""
    launched = app(preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    listener = launched.listener()
    os.kill(launched.proc.pid, signal.SIGHUP)
    time.sleep(1.0)  # four of the launcher's ticks: a HUP it took would have stopped serve run by now
    assert launch.running(listener) and launched.proc.poll() is None
    os.kill(launched.proc.pid, signal.SIGTERM)
    assert launched.wait() == 128 + signal.SIGTERM  # the first stop signal it took: TERM, not the HUP
    assert launched.signals.read_text().split() == ["TERM"] and _free(launched.port)


def test_the_launcher_asks_for_sigterm_at_its_parents_death_before_its_checks(tmp_path):
    """make killed while the launcher clears what an earlier run left (seconds) must not leave it to start
    serve run with no parent: its parent-death signal is set before the first check runs."""
    write_config(tmp_path, free_port())
    probe = (
        "import ctypes, signal, sys; from serve_app import launch\n"
        "def check(*a):\n"
        "    got = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(got), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
        "    print(got.value); raise launch.Refusal('probed')\n"
        "launch.clear_stale = check\n"
        "sys.exit(launch.main(sys.argv[1:]))\n"
    )
    config, pid_file = str(tmp_path / "serve_config.yaml"), str(tmp_path / "run.pid")
    result = subprocess.run(
        [sys.executable, "-c", probe, config, "--pid-file", pid_file], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stdout.split() == [str(int(signal.SIGTERM))], result.stderr


def test_after_a_sigkill_the_next_launch_clears_what_was_left_and_starts(app):
    first = app("first")
    left = first.listener()
    os.kill(first.proc.pid, signal.SIGKILL)  # no cleanup: serve run gets SIGINT (its parent-death signal)
    first.wait()
    deadline = time.monotonic() + BOUND_S
    while first.signals.read_text().split() != ["INT"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.signals.read_text().split() == ["INT"] and launch.running(left) and not _free(first.port)
    second = app("second")
    assert second.listener().key() != left.key()  # a new one holds the port: the stale one was stopped
    assert not launch.running(left)
    assert second.lines() == [
        f"launch: stopped what an earlier run of serve_config.yaml left running: python (PID {left.pid})"
    ]
    os.kill(second.proc.pid, signal.SIGTERM)
    assert second.wait() == 128 + signal.SIGTERM and _free(second.port)


def test_a_second_launch_of_a_running_config_and_a_port_held_by_another_process_are_refused(app, tmp_path):
    running = app("running")
    holder = running.listener()
    again = app("again")
    assert again.wait() == 1
    assert again.lines() == [
        f"launch: refusing to start: serve_config.yaml is already being served by the launcher with PID "
        f"{running.proc.pid}: stop that one first (kill {running.proc.pid})"
    ]
    os.kill(running.proc.pid, signal.SIGKILL)  # the launcher gone, serve run stops (SIGINT), its listener stays
    running.wait()
    running.pid_file.unlink()  # as if the listener had been another program's
    third = app("third")
    assert third.wait() == 1
    assert third.lines() == [
        f"launch: refusing to start: port {running.port} is in use by PID {holder.pid} (python), which this "
        f"launcher did not start: end it (kill {holder.pid}) or change http_options.port"
    ]
    assert launch.running(holder)  # left alone: not ours


def test_a_port_held_by_another_configs_app_names_that_apps_launcher(app, tmp_path):
    """Another config's ``make run`` holds the port (its HAProxy, which Serve would start again if it alone
    were killed): the refusal names that launcher, the one to stop, not the listener."""
    running = app("running")
    holder = running.listener()
    (tmp_path / "other").mkdir()
    write_config(tmp_path / "other", running.port)
    other = Launched(tmp_path / "other", running.port, "other")
    try:
        assert other.wait() == 1
    finally:
        if other.proc.poll() is None:
            os.killpg(other.proc.pid, signal.SIGKILL)
    (line,) = other.lines()
    assert line.startswith(
        f"launch: refusing to start: port {running.port} is in use by PID {holder.pid} (python), started by the "
        f"app of another launcher (PID {running.proc.pid}: "
    )
    assert line.endswith(f"stop that app first (kill {running.proc.pid}); or change http_options.port")
    assert launch.running(holder)


def test_a_recorded_process_is_recognised_by_its_start_time_and_boot_not_its_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        proc = launch.current(sleeper.pid)
        gone = launch.Proc(2**22 + 1, 0, "launcher")  # no such PID
        pid_file = tmp_path / "run.pid"
        # The same PID with another start time: a process that took over the PID of one of ours.
        launch.write_pid_file(pid_file, tmp_path, gone, [launch.Proc(proc.pid, proc.start + 1, proc.name)])
        assert launch.clear_stale(pid_file, tmp_path) == [] and launch.running(proc) and not pid_file.exists()
        # Written before the last boot: nothing in it is ours.
        launch.write_pid_file(pid_file, tmp_path, gone, [proc])
        record = json.loads(pid_file.read_text())
        pid_file.write_text(json.dumps({**record, "boot_id": "another boot"}))
        assert launch.clear_stale(pid_file, tmp_path) == [] and launch.running(proc)
        # Ours: stopped.
        launch.write_pid_file(pid_file, tmp_path, gone, [proc])
        assert launch.clear_stale(pid_file, tmp_path) == [proc] and not launch.running(proc)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_auth_off_on_another_address_is_refused_in_one_line_before_anything_starts(tmp_path):
    port = free_port()
    write_config(tmp_path, port, host="0.0.0.0")
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.launch", str(tmp_path / "serve_config.yaml")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=BOUND_S,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "launch: refusing to start: application 'multimodel': auth.mode is off and http_options.host is '0.0.0.0': "
        "anyone who reaches that address could predict, load and unload models; listen on 127.0.0.1, or set "
        "auth.mode: api_key with its keys"
    ]
    assert not (tmp_path / ".run").exists()
    write_config(tmp_path, port, host="0.0.0.0", auth="api_key")
    assert launch.exposure_refusal(yaml.safe_load((tmp_path / "serve_config.yaml").read_text())) is None


def test_a_config_without_a_host_listens_on_every_interface():
    # Ray's config schema defaults http_options.host to 0.0.0.0 (not serve.run's default from Python), and an
    # empty host is every interface too: both refused with auth off, before anything starts.
    from ray.serve.schema import HTTPOptionsSchema

    assert HTTPOptionsSchema().host == launch.http_host({}) == launch.http_host({"http_options": {"port": 8000}})
    for options in ({"port": 8000}, {"host": "", "port": 8000}):
        config = {"http_options": options, "applications": [{"name": "m", "args": {"auth": {"mode": "off"}}}]}
        refusal = launch.exposure_refusal(config)
        assert refusal is not None and f"http_options.host is {launch.http_host(config)!r}" in refusal
        assert {p.host for p in launch.ports(config, {})} == {launch.http_host(config)}


def test_the_ports_it_checks_are_the_ones_serve_binds():
    # As Ray reads this environment. Its defaults (no variable set) are the launcher's: tests/lifecycle finds
    # HAProxy listening on the ports the launcher checked, with neither variable set (as root).
    from serve_app.core import ray_internals

    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    env = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    found = {(p.port, p.host, p.knob) for p in launch.ports(config, env)}
    fallback_http, fallback_grpc = ray_internals.fallback_proxy_ports().items()
    assert found == {
        (8000, "127.0.0.1", "http_options.port"),
        (9000, "127.0.0.1", "grpc_options.port"),
        *((port, "", var) for var, port in ray_internals.haproxy_ports().items()),
        (fallback_http[1], "127.0.0.1", fallback_http[0]),  # Serve's own proxy behind HAProxy, on the head node
        (fallback_grpc[1], "", fallback_grpc[0]),  # its gRPC on every interface, as Serve's gRPC servers bind
    }
    assert launch.ports(config, {**env, "RAY_SERVE_ENABLE_HA_PROXY": "0"})[2:] == []  # no HAProxy, no stats
    no_grpc = {k: v for k, v in config.items() if k != "grpc_options"}
    assert {p.knob for p in launch.ports(no_grpc, env)} == {
        "http_options.port",
        *ray_internals.haproxy_ports(),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    }


def test_make_run_is_the_launcher_on_serve_config_yaml():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "SERVE_CONFIG ?= serve_config.yaml\n" in makefile
    recipe = makefile.split("\nrun: install models\n", 1)[1].split("\n", 1)[0]
    assert recipe.strip() == "$(PY) -m serve_app.launch $(SERVE_CONFIG)"
