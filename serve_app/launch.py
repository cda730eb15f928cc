"""``make run``'s launcher: ``serve run CONFIG`` under a small supervisor, so that however it is stopped,
everything it started stops with it, and the next ``make run`` starts.

Why: ``serve run`` shuts Serve down on Ctrl-C (SIGINT) only. On SIGTERM (``kill``, systemd, ``docker
stop``, ``timeout``, make passing on its own TERM) it dies at once; Ray ties its GCS and raylet to it, and
the worker processes follow the raylet, but the HAProxy that Serve starts from an actor of its own is not
tied to anything: it can outlive that actor, reparented to init, and keep ports 8000, 9000, 8404 and 9101.
The next ``make run`` then fails to bind them, while the stale HAProxy answers :8000 with errors.

What this process does (Linux; elsewhere it runs ``serve run`` in its place, as ``make run`` did before):

* Before anything starts, three checks, each refusing in one line: a config that would listen on an
  address other than the loopback with auth off (``listen_refusal``, the builder's own rule); a run of the
  same config still going (its launcher alive); a port the app binds (HTTP, gRPC, HAProxy's stats and
  metrics, the fallback proxy's HTTP and gRPC) held by a process this launcher did not start, named with its
  PID and how to end it. What an earlier run of the same config left behind (its launcher killed with
  SIGKILL, a crash) is stopped first.
  "Left behind" means recorded in that run's PID file (``.run/<config>.pid`` beside the config) with the
  same PID, the same start time (``/proc/PID/stat``) and the same boot: a process that reuses a PID is
  never taken for one of ours, and no process is ever recognised by its name.
* It becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process below it whose parent dies (HAProxy,
  when its actor exits) is reparented to it rather than to init, and stays within its reach. It asks for
  SIGTERM when its own parent (make) dies (``PR_SET_PDEATHSIG``), and starts ``serve run`` with SIGINT
  as its own such signal, so that nothing outlives make being killed.
* ``serve run`` runs in a process group of its own: a terminal's Ctrl-C reaches make and this process,
  which passes it on once (a second SIGINT would cut Serve's shutdown short).
* Every second it records every process below it in the PID file (PID, start time, and the name for
  the messages), so that a run killed before it could clean up can be cleaned up by the next.
* Stopping: SIGINT (Ctrl-C) is ``serve run``'s own shutdown, in which Serve drains the ingress replicas
  for 30 s (``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``); a second SIGINT, SIGTERM, SIGHUP and
  SIGQUIT (Ctrl-\\) stop it at once (SIGTERM to its process group; SIGKILL if it has not exited 15 s later).
  A SIGHUP it was started ignoring (``nohup make run &``) stays ignored. Once ``serve run`` has exited, or
  this process fails, every process still below this one is stopped (SIGTERM, then SIGKILL after 5 s) and
  reaped, the PID file is removed, and only then does this process exit: when ``make run`` returns,
  nothing it started runs and the ports are free. Its messages never stop it: a closed terminal or a
  reader gone (``make run | tee``) only loses them.

Usage: ``python -m serve_app.launch [--pid-file PATH] CONFIG`` (``make run`` passes ``serve_config.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve_app.core.config import CONFIG_FILE_HTTP_HOST, AuthArgs, listen_refusal

HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
"""The ports HAProxy binds beside Serve's, by the variable that moves each, with Ray's defaults (a unit test
keeps them equal to Ray's, so that the launcher does not import Ray)."""
FALLBACK_HTTP_PORT = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", 8500)
FALLBACK_GRPC_PORT = ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", 9500)
"""With HAProxy, Serve runs a proxy of its own on the head node behind it (the fallback proxy: for requests
while no ingress replica runs). It binds HTTP where the HTTP entry does and, with gRPC on, gRPC on every
interface; one of them held, ``serve run`` fails with Ray's traceback (``Failed to bind to address``)."""
DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT = 8000, 9000

TICK_S = 0.25
"""How often the launcher looks at ``serve run`` and the signals it got (how late it may act on one)."""
RECORD_S = 1.0
"""How often it records the processes below it in the PID file (a scan of /proc: a few ms)."""
GRACEFUL_S = 120.0
"""After SIGINT, how long ``serve run``'s own shutdown may take before it is stopped at once."""
TERM_S = 15.0
"""After SIGTERM to ``serve run``'s process group, how long before SIGKILL."""
SWEEP_S = 5.0
"""After SIGTERM to what is left below the launcher, how long before SIGKILL."""

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""SIGINT (Ctrl-C): Serve's own shutdown; the others (SIGQUIT is Ctrl-\\), or a second SIGINT: at once."""


def log(message: str) -> None:
    """A line on stderr, if it can still be written: a closed terminal (EIO) or a reader gone (``make run |
    tee``, EPIPE) must not stop the launcher before it has stopped what it started."""
    with contextlib.suppress(OSError, ValueError):
        print(f"launch: {message}", file=sys.stderr, flush=True)


class Refusal(Exception):
    """The launcher does not start: one line saying why."""


# -- processes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """A process as the PID file records it: its PID and start time (clock ticks after boot) together name
    it; ``name`` is for messages only."""

    pid: int
    start: int
    name: str = ""

    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """A process's name and the fields of /proc/PID/stat from field 3 on (state, ppid, ...; field N is at
    index N - 3), or None once it is gone. The name, in parentheses, may hold spaces and parentheses itself."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    end = stat.rindex(")")
    return stat[stat.index("(") + 1 : end], stat[end + 2 :].split()


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """Name, state, parent PID and start time (field 22) of a process, or None once it is gone."""
    read = stat_fields(pid)
    if read is None:
        return None
    name, fields = read
    return name, fields[0], int(fields[1]), int(fields[19])


def current(pid: int) -> Proc | None:
    """The process running as ``pid`` now, or None (gone, or a zombie: it has ended and holds nothing)."""
    stat = _stat(pid)
    if stat is None or stat[1] in ("Z", "X"):
        return None
    return Proc(pid, stat[3], stat[0])


def running(proc: Proc) -> bool:
    """Whether ``proc`` itself still runs: the same PID with the same start time."""
    now = current(proc.pid)
    return now is not None and now.start == proc.start


def descendants(root: int) -> list[Proc]:
    """Every running process below ``root`` in the process tree."""
    stats = {int(e): stat for e in os.listdir("/proc") if e.isdigit() and (stat := _stat(int(e))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (_, _, ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            name, state, _, start = stats[pid]
            if state not in ("Z", "X"):
                found.append(Proc(pid, start, name))
    return sorted(found, key=Proc.key)


def reap() -> dict[int, int]:
    """Collect the exit status of every child that has ended (orphans reparented here included)."""
    ended = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended[pid] = os.waitstatus_to_exitcode(status)


def stop(procs: Iterable[Proc], grace_s: float) -> list[Proc]:
    """SIGTERM each of ``procs`` that still runs, SIGKILL those left after ``grace_s``; returns those that
    were running. Waits (bounded) until they are gone, reaping those that are this process's children."""
    procs = [p for p in procs if running(p)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        for p in procs:
            if running(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap()
            if not any(running(p) for p in procs):
                return procs
            time.sleep(0.05)
    return procs


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# -- the PID file ---------------------------------------------------------------------------------------


def default_pid_file(config: Path) -> Path:
    """``.run/<config file name>.pid`` beside the config: one PID file per config."""
    return config.parent / ".run" / f"{config.name}.pid"


def write_pid_file(path: Path, config: Path, launcher: Proc, procs: list[Proc]) -> None:
    """Record the launcher and every process below it (written whole, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "boot_id": _boot_id(),
        "config": str(config),
        "launcher": [launcher.pid, launcher.start, launcher.name],
        "processes": [[p.pid, p.start, p.name] for p in procs],
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_pid_file(path: Path) -> tuple[Proc, list[Proc]] | None:
    """The launcher and processes a PID file records, or None: no file, an unreadable one, or one written
    before the machine last booted (its PIDs name nothing of ours)."""
    try:
        record = json.loads(path.read_text())
        if record["boot_id"] != _boot_id():
            return None
        return Proc(*record["launcher"]), [Proc(*p) for p in record["processes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_stale(path: Path, config: Path) -> list[Proc]:
    """Stop what an earlier launcher of ``config`` recorded in ``path`` and left running; returns what it
    stopped. Refusal if that launcher still runs: the config is being served."""
    recorded = read_pid_file(path)
    if recorded is not None:
        launcher, procs = recorded
        if running(launcher):
            raise Refusal(
                f"{config.name} is already being served by the launcher with PID {launcher.pid}: "
                f"stop that one first (kill {launcher.pid})"
            )
        left = stop(procs, SWEEP_S)
    else:
        left = []
    path.unlink(missing_ok=True)
    return left


# -- the config: where it listens -----------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    port: int
    host: str
    knob: str
    """what moves it: a field of the config, or a variable of the environment"""


def http_host(config: dict[str, Any]) -> str | None:
    """The address Serve's HTTP entries will listen on: ``http_options.host``, else the default of Ray's config
    schema for a config file, every interface (``CONFIG_FILE_HTTP_HOST``: not the default of Serve started from
    Python). None: HTTP is off."""
    options = config.get("http_options") or {}
    if "host" in options:
        return options["host"]
    return CONFIG_FILE_HTTP_HOST


def exposure_refusal(config: dict[str, Any]) -> str | None:
    """``listen_refusal`` for each application of the config (the builder refuses the same, once Ray runs)."""
    host = http_host(config)
    for app in config.get("applications") or []:
        auth = (app.get("args") or {}).get("auth")
        try:
            auth = AuthArgs.model_validate(auth)
        except ValueError:
            continue  # Serve reports a bad or missing auth with the other args' errors
        refusal = listen_refusal(host, auth)
        if refusal is not None:
            return f"application {app.get('name', '?')!r}: {refusal}"
    return None


def ports(config: dict[str, Any], environ: dict[str, str]) -> list[Port]:
    """The ports the app will bind on this machine at fixed numbers."""
    host = http_host(config)
    http, grpc = config.get("http_options") or {}, config.get("grpc_options") or {}
    found = []
    if host is not None:
        found.append(Port(int(http.get("port", DEFAULT_HTTP_PORT)), host, "http_options.port"))
        if grpc.get("grpc_servicer_functions"):
            found.append(Port(int(grpc.get("port", DEFAULT_GRPC_PORT)), host, "grpc_options.port"))
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # HAProxy binds these on every interface
        found += [Port(int(environ.get(var, default)), "", var) for var, default in HAPROXY_PORTS.items()]
        (http_var, http_port), (grpc_var, grpc_port) = FALLBACK_HTTP_PORT, FALLBACK_GRPC_PORT
        if host is not None:
            found.append(Port(int(environ.get(http_var, http_port)), host, http_var))
            if grpc.get("grpc_servicer_functions"):
                found.append(Port(int(environ.get(grpc_var, grpc_port)), "", grpc_var))
    return found


def _bindable(port: Port) -> bool:
    family = socket.AF_INET6 if ":" in port.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no holder
        try:
            s.bind((port.host, port.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def listeners(port: int) -> list[int]:
    """The PIDs of the processes that hold a listening TCP socket on ``port`` in this network namespace
    (those this user may look at)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        pids.add(int(entry))
                        break
    return sorted(pids)


def _cmdline(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv if a)


def _started_by(pid: int) -> str | None:
    """What started a process, where that is what to stop instead of it: another launcher of this project
    (another config's ``make run``), whose app Serve restarts HAProxy for, or else a Ray instance's raylet
    (``ray start``, a ``serve run`` of its own); None if neither is above it."""
    for _ in range(64):  # up the process tree to init
        stat = _stat(pid)
        if stat is None or pid <= 1:
            return None
        command = _cmdline(pid)
        if pid != os.getpid() and "serve_app.launch" in command:
            command = command if len(command) <= 100 else command[:97] + "..."
            return f"the app of another launcher (PID {pid}: {command}): stop that app first (kill {pid})"
        if stat[0] == "raylet":
            return f"a Ray instance already running here (raylet PID {pid}): stop it (ray stop) or its Serve apps"
        pid = stat[2]
    return None


def port_refusal(wanted: list[Port]) -> str | None:
    """One line naming a port the app needs that something else holds, what holds it and how to end it: where
    another app of Serve holds it (its HAProxy, which Serve would start again if it were killed alone), that
    app."""
    for port in wanted:
        if _bindable(port):
            continue
        holders = [p for p in map(current, listeners(port.port)) if p is not None]
        if not holders:
            return f"port {port.port} is in use, by a process this user cannot see: free it or change {port.knob}"
        who = ", ".join(f"PID {p.pid} ({p.name})" for p in holders)
        owner = next(filter(None, (_started_by(p.pid) for p in holders)), None)
        if owner is not None:
            return f"port {port.port} is in use by {who}, started by {owner}; or change {port.knob}"
        pids = " ".join(str(p.pid) for p in holders)
        return (
            f"port {port.port} is in use by {who}, which this launcher did not start: "
            f"end it (kill {pids}) or change {port.knob}"
        )
    return None


# -- running serve run ----------------------------------------------------------------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


class Signals:
    """The stop signals received, in order (handlers only record them; the main loop acts). A SIGHUP this
    process was started ignoring (``nohup make run &``) stays ignored, as make keeps it: closing the terminal
    then leaves the app running, as the user asked."""

    def __init__(self) -> None:
        self.received: list[int] = []
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, lambda signum, _frame: self.received.append(signum))

    def stop_with_parent(self) -> None:
        """SIGTERM to this process when its parent (make) dies, recorded like any stop signal; one that died
        already is taken as such a SIGTERM. Set first of all: make may be killed during the start-up checks."""
        parent = os.getppid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            self.received.append(signal.SIGTERM)


def _serve_command(config: Path) -> list[str]:
    serve = Path(sys.executable).with_name("serve")
    return [str(serve) if serve.exists() else (shutil.which("serve") or "serve"), "run", str(config)]


def supervise(config: Path, pid_file: Path, signals: Signals) -> int:
    """Run ``serve run`` until it exits or a signal stops it, then stop everything left below this process.
    Returns the exit status: 128 + the first stop signal, or ``serve run``'s own."""
    me = current(os.getpid())
    assert me is not None
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        write_pid_file(pid_file, config, me, [])
    except OSError as e:
        log(f"refusing to start: cannot write the PID file {pid_file} ({e.strerror}): name another with --pid-file")
        return 1
    if signals.received:
        pid_file.unlink(missing_ok=True)
        return 128 + signals.received[0]

    def as_child() -> None:  # in the child, before exec: a process group of its own, SIGINT when this dies
        os.setpgid(0, 0)
        _prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != me.pid:
            os._exit(1)

    child = subprocess.Popen(_serve_command(config), stdin=subprocess.DEVNULL, preexec_fn=as_child)

    def signal_child(sig: int) -> None:  # serve run's process group: it, and Ray's GCS and raylet
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)

    graceful = at_once = False
    handled, deadline, recorded, stopping_since, next_record = 0, float("inf"), None, 0.0, 0.0
    try:
        while True:
            status = reap().get(child.pid)
            if status is not None:
                child.returncode = status
                break
            for sig in signals.received[handled:]:
                handled += 1
                if at_once:
                    continue
                stopping_since = stopping_since or time.monotonic()
                if sig == signal.SIGINT and not graceful:  # Ctrl-C: serve run's own shutdown
                    graceful, deadline = True, time.monotonic() + GRACEFUL_S
                    signal_child(signal.SIGINT)
                    log("stopping: Serve shuts down, its ingress replicas drain for 30 s (Ctrl-C again: at once)")
                else:  # SIGTERM, SIGHUP, SIGQUIT, a second SIGINT: at once
                    at_once, deadline = True, time.monotonic() + TERM_S
                    signal_child(signal.SIGTERM)
                    log(f"stopping at once ({signal.Signals(sig).name}): serve run and every process it started")
            if time.monotonic() > deadline:  # serve run outlasted its time: SIGTERM after SIGINT, else SIGKILL
                if not at_once:
                    at_once, deadline = True, time.monotonic() + TERM_S
                    signal_child(signal.SIGTERM)
                else:
                    deadline = float("inf")
                    signal_child(signal.SIGKILL)
            if time.monotonic() >= next_record:
                next_record = time.monotonic() + RECORD_S
                procs = descendants(me.pid)
                if procs != recorded:
                    write_pid_file(pid_file, config, me, procs)
                    recorded = procs
            time.sleep(TICK_S)
    finally:  # whatever ended the loop (an error of this process too): nothing it started outlives it
        left = stop(descendants(me.pid), SWEEP_S)
        reap()
        pid_file.unlink(missing_ok=True)
    if handled:  # serve run stopped on a signal passed on (not one that came as it exited on its own)
        outlived = f", and {len(left)} processes that outlived it ({', '.join(sorted({p.name for p in left}))})"
        log(f"stopped in {time.monotonic() - stopping_since:.1f} s: serve run" + (outlived if left else ""))
        return 128 + signals.received[0]
    rc = child.returncode
    return 128 - rc if rc < 0 else rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the Serve config (serve_config.yaml)")
    parser.add_argument("--pid-file", type=Path, help="where to record the processes (default: .run/<config>.pid)")
    args = parser.parse_args(argv)
    config = Path(args.config).resolve()
    if not Path("/proc/self/stat").exists():  # no /proc (macOS): serve run alone, as before
        os.execv(_serve_command(config)[0], _serve_command(config))
    signals = Signals()
    signals.stop_with_parent()
    pid_file = args.pid_file or default_pid_file(config)
    environ = dict(os.environ)
    try:
        try:
            content = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise Refusal(f"cannot read {config}: {' '.join(str(e).split())}") from e
        refusal = exposure_refusal(content)
        if refusal is not None:
            log(f"refusing to start: {refusal}")
            return 2
        cleared = clear_stale(pid_file, config)
        if cleared:
            names = ", ".join(f"{p.name} (PID {p.pid})" for p in cleared)
            log(f"stopped what an earlier run of {config.name} left running: {names}")
        refusal = port_refusal(ports(content, environ))
        if refusal is not None:
            raise Refusal(refusal)
    except Refusal as e:
        log(f"refusing to start: {e}")
        return 1
    return supervise(config, pid_file, signals)


if __name__ == "__main__":
    sys.exit(main())
