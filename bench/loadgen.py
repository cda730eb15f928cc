"""The benchmark's load generators: processes of their own that cost the servers they measure almost nothing.

The benchmark runs on the same CPUs as the servers it measures, so whatever CPU its clients use, the
servers lack, and each request's latency carries the client's own time. httpx cost 1.0 to 2.8 ms of CPU a
request; the HTTP generators here cost well under 0.5 ms, the gRPC stubs 0.2 to 0.6 (``docs/performance.md``,
"The load generator"):

* ``wrk`` (``apt-get install wrk``), driven by ``bench/loadgen.lua``: one connection per wrk thread, so a
  thread's requests and answers alternate, each answer is checked against its own request and timed in
  Lua, and each client sends its requests in plan order. wrk's own latency histogram is not used: wrk
  "corrects" it for coordinated omission with synthetic samples before its ``done`` hook sees it.
* ``rawhttp``, this module's own, where wrk is not installed: HTTP/1.1 over raw non-blocking sockets in one
  epoll loop, every request encoded before the run starts, in worker processes of its own (``python -S``,
  the standard library only), kept from run to run.
* gRPC (wrk does not speak it): ``grpc`` stubs in a worker process of their own, a thread per client making
  blocking calls with the request already serialized, through one channel.

Every generator runs a ``Plan`` (each client's requests, in order) as a closed loop: a client sends its
next request when the last one is answered. Each reports per-request latencies of the requests answered as
planned, the counts of what it sent and what failed, the time from its first request to its last answer,
and its own CPU time, from which the benchmark reports the CPU each request cost the machine.

This module imports nothing outside the standard library at its top: its HTTP worker processes run it
under ``python -S -m bench.loadgen``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "loadgen.lua"
HTTP_GENERATORS = ("wrk", "rawhttp")
RUN_LIMIT_S = 900.0
"""The longest a run may take before its generator is stopped and the run fails."""


# -- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One HTTP request of a plan. `expect` is a JSON key and the string value that a good answer carries
    (a 200 without it counts as a mismatch); a body is JSON, without tabs or newlines (json.dumps)."""

    method: str
    path: str
    body: bytes = b""
    expect: tuple[str, str] | None = None


@dataclass
class Plan:
    """Each client's requests, in the order it sends them, for the server at `url` (http://host:port, and
    a path prefix that every request's path gets, if any). With `duration_s`, each client instead cycles
    through its requests until that many seconds have passed since its first one."""

    url: str
    clients: list[list[Request]]
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not self.clients or any(not c for c in self.clients):
            raise ValueError("every client of a plan needs at least one request")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname or parts.query:
            raise ValueError(f"not an http:// URL of a server: {self.url}")

    @property
    def base(self) -> str:
        """scheme://host:port, as the generators connect."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def requests(self) -> int:
        return sum(len(c) for c in self.clients)


def spread(requests: list[Request], clients: int) -> list[list[Request]]:
    """Requests over `clients` clients, request i to client i % clients, each in the order given (never
    more clients than requests)."""
    clients = max(1, min(clients, len(requests)))
    return [requests[k::clients] for k in range(clients)]


def write_plan(plan: Plan, path: Path) -> Path:
    """The plan as both HTTP generators read it: one line a request, tab-separated: client index, method,
    path, expected key, expected value, body."""
    lines = []
    for k, client in enumerate(plan.clients):
        for r in client:
            key, value = r.expect or ("", "")
            fields = [str(k), r.method, plan.prefix + r.path, key, value, r.body.decode("ascii")]
            if any(c in f for f in fields for c in "\t\r\n"):
                raise ValueError(f"a plan field holds a tab or a line break: {fields!r}")
            if not re.fullmatch(r"[A-Z]+", r.method) or not r.path.startswith("/"):
                raise ValueError(f"not a request line: {r.method} {r.path}")
            if not re.fullmatch(r"[A-Za-z0-9_.:/ -]*", key + value):
                raise ValueError(f"an expected key or value beyond letters, digits and _.:/ -: {r.expect}")
            lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_plan(path: Path, clients: set[int] | None = None) -> dict[int, list[Request]]:
    """write_plan's file, back: client index -> its requests in order (only `clients`, where given)."""
    out: dict[int, list[Request]] = {}
    for line in path.read_text().splitlines():
        k, method, p, key, value, body = line.split("\t")
        if clients is None or int(k) in clients:
            out.setdefault(int(k), []).append(Request(method, p, body.encode(), (key, value) if key else None))
    return out


def encode(r: Request, host: str) -> bytes:
    """The request's bytes on the wire: HTTP/1.1, kept alive."""
    head = f"{r.method} {r.path} HTTP/1.1\r\nHost: {host}\r\n"
    if r.body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(r.body)}\r\n"
    elif r.method in ("POST", "PUT"):
        head += "Content-Length: 0\r\n"
    return (head + "\r\n").encode("ascii") + r.body


def expect_pattern(expect: tuple[str, str] | None) -> re.Pattern[bytes] | None:
    """The check of an answer's body: `"key": "value"` with any JSON whitespace around the colon (the
    Lua script builds the same pattern)."""
    if expect is None:
        return None
    key, value = (re.escape(s.encode()) for s in expect)
    return re.compile(rb'"' + key + rb'"[ \t\r\n]*:[ \t\r\n]*"' + value + rb'"')


# -- results ------------------------------------------------------------------------------------------


ERRORS = ("status", "mismatch", "lost", "connect")
"""What can fail: a request answered other than 200, answered 200 without the expected value, or not
answered (the connection closed or reset, or what came was not HTTP); these three count among the requests
sent. And a connection that could not be opened (rawhttp skips that request; wrk tries again)."""


@dataclass
class Result:
    """What a generator measured over one plan."""

    generator: str
    latencies: list[float] = field(default_factory=list)  # seconds, each request answered as planned
    sent: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERRORS, 0))
    codes: dict[str, int] = field(default_factory=dict)  # status codes other than 200, and their counts
    first: float = float("inf")  # time.monotonic() of the first request sent
    last: float = float("-inf")  # and of the last answer
    cpu_s: float = 0.0  # the generator's CPU time while it ran the plan (from its first request on)
    cpu_total_s: float = 0.0  # the whole run's: wrk's process; a worker's run (its start, once, left out)
    first_error: str = ""  # what the first failure was: a status and the start of its body, a gRPC code...

    def error(self, text: str) -> None:
        """Keep the first failure's description (a run's failures are mostly alike)."""
        if not self.first_error:
            self.first_error = text[:200]

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def answered_or_lost(self) -> int:
        """ok + status + mismatch + lost: equals ``sent`` in a consistent result."""
        return self.ok + self.errors["status"] + self.errors["mismatch"] + self.errors["lost"]

    @property
    def elapsed(self) -> float:
        return max(0.0, self.last - self.first) if self.latencies or self.failed else 0.0

    def add(self, other: Result) -> None:
        """Merge what another process of the same run measured."""
        self.latencies += other.latencies
        self.sent += other.sent
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        for k, v in other.codes.items():
            self.codes[k] = self.codes.get(k, 0) + v
        self.first, self.last = min(self.first, other.first), max(self.last, other.last)
        self.cpu_s += other.cpu_s
        self.cpu_total_s += other.cpu_total_s
        self.error(other.first_error)


# -- HTTP/1.1 answers -----------------------------------------------------------------------------------


class ProtocolError(Exception):
    """What the server sent is not an HTTP/1.1 answer to one request."""


class Response(NamedTuple):
    status: int
    body: bytes
    keep_alive: bool


MAX_HEAD = 64 * 1024


class ResponseParser:
    """One HTTP/1.1 response at a time on one connection (requests are never pipelined). ``feed`` the bytes
    as they come; it returns the response once complete, else None. The body is framed by Content-Length,
    chunked transfer coding, or the end of the connection (``eof``); interim 1xx responses are skipped."""

    __slots__ = ("buf", "chunked", "keep_alive", "length", "parts", "status")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = None
        self.length: int | None = None  # body bytes still to come, when framed by Content-Length
        self.chunked = False
        self.keep_alive = True
        self.parts: list[bytes] = []  # chunked: the body so far

    def feed(self, data: bytes) -> Response | None:
        buf = self.buf
        buf += data
        while self.status is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("no end of the response head")
                return None
            self._head(bytes(buf[:end]))
            del buf[: end + 4]
        if self.length is not None:
            if len(buf) < self.length:
                return None
            if len(buf) > self.length:
                raise ProtocolError("bytes after the response (none was asked for)")
            body = bytes(buf)
            buf.clear()
            return self._done(body)
        if self.chunked:
            return self._chunks()
        return None  # the body ends with the connection

    def eof(self) -> Response | None:
        """The server closed the connection: the response framed by it, else ProtocolError (None when
        nothing of a response had come)."""
        if self.status is None and not self.buf:
            return None
        if self.status is None or self.length is not None or self.chunked:
            raise ProtocolError("the connection closed in the middle of a response")
        body = bytes(self.buf)
        self.buf.clear()
        return self._done(body)

    def _done(self, body: bytes) -> Response:
        response = Response(self.status, body, self.keep_alive)  # type: ignore[arg-type]
        self._reset()
        return response

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3 or rest[3:4].strip():
            raise ProtocolError(f"not a status line: {lines[0][:80]!r}")
        status = int(code)
        keep_alive = version == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"not a header line: {line[:80]!r}")
            name, value = name.lower(), value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ProtocolError(f"bad Content-Length: {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not chunked:
                    raise ProtocolError(f"a transfer coding other than chunked: {value[:40]!r}")
            elif name == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                keep_alive = b"close" not in tokens and (keep_alive or b"keep-alive" in tokens)
        if 100 <= status < 200:
            return  # an interim response: the real one follows
        self.status, self.keep_alive = status, keep_alive
        if status in (204, 304):
            self.length = 0
        elif chunked:
            self.chunked = True
        elif length is not None:
            self.length = length
        else:
            self.keep_alive = False  # the body runs to the end of the connection

    def _chunks(self) -> Response | None:
        buf = self.buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("no end of a chunk's size line")
                return None
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size: {size_text[:20]!r}") from None
            if size < 0 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                raise ProtocolError(f"bad chunk size: {size_text[:20]!r}")
            if size == 0:  # the last chunk, then trailer lines up to an empty one
                if buf[line_end + 2 : line_end + 4] == b"\r\n":
                    end = line_end + 4
                else:
                    trailer_end = buf.find(b"\r\n\r\n", line_end + 2)
                    if trailer_end < 0:
                        return None
                    end = trailer_end + 4
                if len(buf) > end:
                    raise ProtocolError("bytes after the response (none was asked for)")
                buf.clear()
                return self._done(b"".join(self.parts))
            start = line_end + 2
            if len(buf) < start + size + 2:
                return None
            if buf[start + size : start + size + 2] != b"\r\n":
                raise ProtocolError("a chunk not followed by CRLF")
            self.parts.append(bytes(buf[start : start + size]))
            del buf[: start + size + 2]


# -- rawhttp: this module's own generator --------------------------------------------------------------


class _Client:
    """One client of a rawhttp worker: its connection, its requests, where it is in them."""

    __slots__ = ("checks", "k", "out", "parser", "reqs", "sock", "t_sent")

    def __init__(self, reqs: list[bytes], checks: list[re.Pattern[bytes] | None]) -> None:
        self.reqs, self.checks = reqs, checks
        self.k = -1  # the request in flight
        self.sock: socket.socket | None = None
        self.parser = ResponseParser()
        self.out = b""  # what is left to send of the request in flight
        self.t_sent = 0.0


def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run_clients(
    addr: tuple[str, int], plans: list[list[Request]], duration_s: float | None = None, ready=None
) -> Result:
    """Run clients' plans over raw sockets in this process, in one epoll loop; `ready` is called once every
    client is connected, before the first request. Returns what they measured, CPU time included."""
    host = f"{addr[0]}:{addr[1]}"
    clients = [_Client([encode(r, host) for r in p], [expect_pattern(r.expect) for r in p]) for p in plans]
    result = Result("rawhttp")
    errors, codes, latencies = result.errors, result.codes, result.latencies
    ep = select.epoll()
    by_fd: dict[int, _Client] = {}
    IN, OUT = select.EPOLLIN, select.EPOLLOUT

    def attach(c: _Client) -> bool:
        try:
            c.sock = _connect(addr)
        except OSError:
            c.sock = None
            return False
        c.parser = ResponseParser()
        by_fd[c.sock.fileno()] = c
        ep.register(c.sock.fileno(), IN)
        return True

    def detach(c: _Client) -> None:
        if c.sock is not None:
            fd = c.sock.fileno()
            ep.unregister(fd)
            del by_fd[fd]
            c.sock.close()
            c.sock = None
            c.out = b""

    for c in clients:
        attach(c)  # where it fails, the client's first request tries again
    if ready is not None:
        ready()
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + duration_s if duration_s else None
    active = len(clients)

    def send_next(c: _Client) -> None:
        """The client's next request, or its end (its plan done, or, timed, its time up: it cycles through its
        plan until then); a request it cannot connect for counts and is skipped."""
        nonlocal active
        while True:
            c.k += 1
            if deadline is not None and time.monotonic() < deadline:
                c.k %= len(c.reqs)
            elif deadline is not None or c.k >= len(c.reqs):
                detach(c)
                active -= 1
                return
            if c.sock is None and not attach(c):
                errors["connect"] += 1  # the request is not sent: the client goes on with its next one
                result.error(f"no connection to {host}")
                continue
            sock = c.sock
            data = c.reqs[c.k]
            t = time.monotonic()
            if result.first > t:
                result.first = t
            c.t_sent = t
            result.sent += 1
            try:
                n = sock.send(data)
            except OSError:
                n = 0  # the answer never comes: the next recv reports the broken connection
            if n < len(data):
                c.out = data[n:]
                ep.modify(sock.fileno(), IN | OUT)
            return

    def lost(c: _Client, why: str) -> None:
        errors["lost"] += 1
        result.error(f"no answer: {why}")
        result.last = time.monotonic()
        detach(c)
        send_next(c)

    for c in clients:
        send_next(c)
    while active:
        for fd, ev in ep.poll():
            c = by_fd.get(fd)
            if c is None:
                continue
            if ev & OUT and c.out:
                try:
                    n = c.sock.send(c.out)
                except OSError as e:
                    lost(c, str(e))
                    continue
                c.out = c.out[n:]
                if not c.out:
                    ep.modify(fd, IN)
                continue
            try:
                data = c.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                lost(c, str(e))
                continue
            try:
                response = c.parser.feed(data) if data else c.parser.eof()
            except ProtocolError as e:
                lost(c, str(e))
                continue
            if response is None:
                if not data:
                    lost(c, "the connection closed")
                continue
            t = time.monotonic()
            result.last = t
            if response.status != 200:
                errors["status"] += 1
                codes[str(response.status)] = codes.get(str(response.status), 0) + 1
                result.error(f"{response.status}: {response.body[:150].decode(errors='replace')}")
            elif c.checks[c.k] is not None and c.checks[c.k].search(response.body) is None:
                errors["mismatch"] += 1
                result.error(f"200 without the expected value: {response.body[:150].decode(errors='replace')}")
            else:
                latencies.append(t - c.t_sent)
            if not (data and response.keep_alive):
                detach(c)
            send_next(c)
    ep.close()
    result.cpu_s = time.process_time() - cpu0
    return result


def _http_run(command: dict, ready) -> Result:
    """A rawhttp worker's run: its clients of the plan file, against the server at `url`."""
    parts = urlsplit(command["url"])
    wanted = command["clients"]
    plan = read_plan(Path(command["plan"]), set(wanted))
    addr = (parts.hostname or "127.0.0.1", parts.port or 80)
    return run_clients(addr, [plan[k] for k in wanted], command["duration"], ready)


def _serve(kind: str) -> None:
    """A worker process: one run per command (a JSON line on stdin). It prepares the run (its requests
    encoded, its connections open), prints "ready", waits for "go", runs, and prints its Result as JSON; it
    ends with its stdin (the benchmark's end, or its death)."""
    run = _http_run if kind == "http-worker" else _grpc_run

    def ready() -> None:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit(0)

    for line in sys.stdin:
        cpu0 = time.process_time()
        result = run(json.loads(line), ready)
        result.cpu_total_s = time.process_time() - cpu0
        print(json.dumps(result.__dict__), flush=True)


class _Proc:
    """A process this module started, reaped with wait4 (its CPU time). Signals go through ``signal``,
    never Popen's (which reaps an ended process itself, and its CPU time with it); a process is reaped
    under a lock, so no signal reaches another process that took its pid."""

    def __init__(self, cmd: list[str], stdin: bool = False) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the object)
        self.proc = subprocess.Popen(
            cmd,
            cwd=HERE.parent,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.lock = threading.Lock()
        self.cpu_s = 0.0

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.proc.returncode is None:  # ended but not reaped, it keeps its pid
                os.kill(self.proc.pid, sig)

    def reap(self) -> int:
        """Wait for it to end: its exit code, and its whole CPU time in cpu_s."""
        if self.proc.returncode is None:
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)  # ended; reaped below
            with self.lock:
                _, status, usage = os.wait4(self.proc.pid, 0)
                self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.stderr.close()
        return self.proc.returncode

    def error_text(self) -> str:
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.signal(signal.SIGKILL)
            self.reap()


def _watchdog(procs: list[_Proc], limit_s: float) -> threading.Timer:
    """Kill the processes still running after `limit_s` (a server that stopped answering)."""

    def fire() -> None:
        for p in procs:
            p.signal(signal.SIGKILL)

    timer = threading.Timer(limit_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def _worker_command(kind: str) -> list[str]:
    """This module as a worker: the HTTP one under `python -S` (the standard library only: a faster start),
    the gRPC one with the environment's packages (grpc). Run with -m from the project root, so that its
    compiled form is cached."""
    flags = ["-S"] if kind == "http-worker" else []
    return [sys.executable, *flags, "-m", "bench.loadgen", kind]


_idle: dict[str, list[_Proc]] = {"http-worker": [], "grpc-worker": []}
_idle_lock = threading.Lock()


def _take(kind: str, n: int) -> list[_Proc]:
    """`n` worker processes of a kind: idle ones first, new ones for the rest."""
    with _idle_lock:
        pool = _idle[kind]
        alive = [w for w in pool if w.proc.poll() is None]
        pool[:] = alive[n:]
        taken = alive[:n]
    return taken + [_Proc(_worker_command(kind), stdin=True) for _ in range(n - len(taken))]


def shutdown() -> None:
    """End the idle worker processes (each ends when its stdin closes); every run's are idle after it.
    Called at this process's exit too."""
    with _idle_lock:
        workers = [w for pool in _idle.values() for w in pool]
        for pool in _idle.values():
            pool.clear()
    for w in workers:
        with contextlib.suppress(OSError):
            w.proc.stdin.close()
    for w in workers:
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        w.stderr.close()


atexit.register(shutdown)


def _run_workers(kind: str, commands: list[dict], name: str, limit_s: float) -> Result:
    """One run over worker processes, a command each: all prepare, then all start at once; their results,
    merged. A worker that fails, or outlives `limit_s`, is killed and the run fails."""
    workers = _take(kind, len(commands))
    timer = _watchdog(workers, limit_s)
    ok = False
    try:
        for w, command in zip(workers, commands, strict=True):
            w.proc.stdin.write(json.dumps(command) + "\n")
            w.proc.stdin.flush()
        for w in workers:
            if w.proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{name}: a worker did not get ready: {w.error_text()}")
        for w in workers:
            w.proc.stdin.write("go\n")
            w.proc.stdin.flush()
        result = Result(name)
        for w in workers:
            line = w.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name}: a worker ended in its run: {w.error_text()}")
            result.add(Result(**json.loads(line)))
        ok = True
        return result
    finally:
        timer.cancel()
        if ok:
            with _idle_lock:
                _idle[kind] += workers
        else:
            for w in workers:
                w.kill()


def run_rawhttp(plan: Plan, processes: int = 1, limit_s: float = RUN_LIMIT_S) -> Result:
    """The plan through rawhttp worker processes (its clients dealt out among them)."""
    processes = max(1, min(processes, len(plan.clients)))
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        path = write_plan(plan, Path(tmp) / "plan.tsv")
        commands = [
            {
                "url": plan.base,
                "plan": str(path),
                "clients": list(range(g, len(plan.clients), processes)),
                "duration": plan.duration_s,
            }
            for g in range(processes)
        ]
        return _run_workers("http-worker", commands, "rawhttp", limit_s)


# -- wrk -----------------------------------------------------------------------------------------------


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    """wrk's version line, e.g. "wrk debian/4.1.0-3+b2 [epoll]"."""
    exe = wrk_path()
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(" Copyright")[0].strip() if out else "wrk"


def wrk_command(plan_path: Path, plan: Plan, budget_s: float) -> list[str]:
    """wrk with one thread per client, each thread one connection, for at most `budget_s` seconds."""
    clients = len(plan.clients)
    return [
        wrk_path() or "wrk",
        "-t",
        str(clients),
        "-c",
        str(clients),
        "-d",
        f"{max(1, int(budget_s))}s",
        "--timeout",
        "60s",  # wrk 4.1 only uses it as its latency histogram's top (wrk's own figures: unused here)
        "-s",
        str(LUA_SCRIPT),
        plan.base,
        str(plan_path),
        str(plan.duration_s or 0),
    ]


_CLIENT_LINE = re.compile(r"^@client (\d+) (.*)$")


def parse_wrk_output(text: str, clients: int) -> Result:
    """What bench/loadgen.lua printed: one `@client` line per thread (its counts, its CPU time from its first
    request to its last answer, and the latencies, in microseconds, of its requests answered as planned)
    and wrk's own count of answers (`@wrk`), which must equal the clients' answers."""
    result = Result("wrk")
    parts: dict[int, Result] = {}
    wrk_answers = None
    for line in text.splitlines():
        m = _CLIENT_LINE.match(line)
        if m:
            k = int(m.group(1))
            if k in parts:
                raise ValueError(f"wrk: client {k} reported twice")
            fields = dict(kv.split("=", 1) for kv in m.group(2).split(" "))
            part = Result("wrk", sent=int(fields["sent"]))
            part.latencies = [float(x) / 1e6 for x in fields["lat"].split(",") if x]
            if len(part.latencies) != int(fields["ok"]):
                raise ValueError(f"wrk: client {k}: {fields['ok']} answered, {len(part.latencies)} latencies")
            part.errors = {e: int(fields[e]) for e in ("status", "mismatch", "lost")} | {"connect": 0}
            part.codes = dict(kv.split(":") for kv in fields["codes"].split(",") if kv)
            part.codes = {c: int(n) for c, n in part.codes.items()}
            if part.ok or part.failed:
                part.first, part.last = float(fields["first"]), float(fields["last"])
            part.cpu_s = float(fields["cpu"])
            part.error(bytes.fromhex(fields["err"]).decode(errors="replace"))
            parts[k] = part
        elif line.startswith("@wrk "):
            wrk = dict(kv.split("=", 1) for kv in line[5:].split(" "))
            wrk_answers = int(wrk["requests"])
            result.errors["connect"] += int(wrk["connect"])
    for k in sorted(parts):  # in client order, whatever order the threads ended in
        result.add(parts[k])
    missing = sorted(set(range(clients)) - set(parts))
    if missing:
        raise ValueError(f"wrk: clients {missing} did not finish (output: {text[-500:]!r})")
    if wrk_answers is None:
        raise ValueError(f"wrk: no summary (output: {text[-500:]!r})")
    answered = result.ok + result.errors["status"] + result.errors["mismatch"]
    if wrk_answers != answered:
        raise ValueError(f"wrk counted {wrk_answers} answers, its clients {answered}")
    return result


def run_wrk(plan: Plan, limit_s: float = RUN_LIMIT_S) -> Result:
    """The plan through wrk and bench/loadgen.lua. Each thread prints its line when its plan is done; once
    all have, wrk is interrupted (SIGINT ends its wait for `-d`), prints its summary and exits."""
    if wrk_path() is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk), or choose the rawhttp generator")
    clients = len(plan.clients)
    budget = (plan.duration_s + 30) if plan.duration_s else limit_s
    parts = urlsplit(plan.base)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=10):
        pass  # wrk would retry a refused connection until its time is up: fail now instead
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        path = write_plan(plan, Path(tmp) / "plan.tsv")
        proc = _Proc(wrk_command(path, plan, budget))
        lines: list[str] = []
        interrupter: threading.Thread | None = None
        stop = threading.Event()
        hard = _watchdog([proc], budget + 60)
        try:
            done = 0
            for line in proc.proc.stdout:
                lines.append(line)
                if line.startswith("@client "):
                    done += 1
                    if done == clients:  # wrk ignores SIGINT until its threads started: repeat it
                        interrupter = threading.Thread(target=_repeat_signal, args=(proc, stop), daemon=True)
                        interrupter.start()
            stop.set()
            if interrupter is not None:
                interrupter.join()
            code = proc.reap()
        finally:
            hard.cancel()
            stop.set()
            proc.kill()
        if code != 0:
            raise RuntimeError(f"wrk failed (exit {code}): {proc.error_text()}")
        result = parse_wrk_output("".join(lines), clients)
        result.cpu_total_s = proc.cpu_s
        return result


def _repeat_signal(proc: _Proc, stop: threading.Event, every_s: float = 0.5) -> None:
    while not stop.is_set():
        proc.signal(signal.SIGINT)
        stop.wait(every_s)


# -- choosing the HTTP generator --------------------------------------------------------------------------

_chosen: str | None = None


def use(name: str | None) -> str:
    """Set the HTTP generator of this process's runs: "wrk", "rawhttp", or None for the default (the
    environment's BENCH_GENERATOR, else wrk where it is installed, else rawhttp)."""
    global _chosen
    name = name or os.environ.get("BENCH_GENERATOR") or ("wrk" if wrk_path() else "rawhttp")
    if name not in HTTP_GENERATORS:
        raise ValueError(f"unknown load generator {name!r}: one of {HTTP_GENERATORS}")
    if name == "wrk" and wrk_path() is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    _chosen = name
    return name


def chosen() -> str:
    return _chosen or use(None)


def describe(name: str) -> str:
    """The generator's name as the report gives it."""
    if name == "wrk":
        return f"{wrk_version()}, with bench/loadgen.lua"
    if name == "rawhttp":
        return "rawhttp (bench/loadgen.py: raw sockets, one epoll loop, requests encoded beforehand)"
    return name


def run_http(plan: Plan, generator: str | None = None) -> Result:
    """The plan through the chosen HTTP generator (or `generator`)."""
    name = generator or chosen()
    return run_wrk(plan) if name == "wrk" else run_rawhttp(plan, processes=1 + (len(plan.clients) > 32))


# -- gRPC ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcRequest:
    """One unary call: the method's full name, the request already serialized, and the string that field
    1 of a good answer holds (ModelInferResponse.model_name)."""

    method: str
    message: bytes
    expect: str | None = None


def proto_string_field(message: bytes, number: int) -> str | None:
    """The value of a string field of a serialized protobuf message (its last occurrence), without the
    message's class: the generator checks answers without building them."""
    i, found, n = 0, None, len(message)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = message[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size = varint()
            if key >> 3 == number:
                found = message[i : i + size].decode()
            i += size
        else:
            raise ValueError(f"wire type {wire} not supported")
        if i > n:
            raise ValueError("truncated field")
    return found


_channels: dict[str, object] = {}


def _grpc_run(command: dict, ready) -> Result:
    """A gRPC worker's run: a thread per client making blocking calls with the pre-serialized requests
    through one channel (this worker's to that target, kept from run to run)."""
    import grpc

    target, app, duration_s = command["target"], command["app"], command["duration"]
    plans: dict[int, list[tuple[str, bytes, str]]] = {}
    for line in Path(command["plan"]).read_text().splitlines():
        k, method, expect, message = line.split("\t")
        plans.setdefault(int(k), []).append((method, base64.b64decode(message), expect))
    metadata = (("application", app),) if app else None
    channel = _channels.get(target)
    if channel is None:
        channel = _channels[target] = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=60)
    methods = {m: channel.unary_unary(m) for p in plans.values() for m, _, _ in p}
    parts = [Result("grpc") for _ in plans]
    ready()

    def client(plan: list[tuple[str, bytes, str]], out: Result) -> None:
        start = time.monotonic()
        k = 0
        while True:
            if k >= len(plan):
                if not duration_s or time.monotonic() - start >= duration_s:
                    return
                k = 0
            method, message, expect = plan[k]
            k += 1
            t0 = time.monotonic()
            out.first = min(out.first, t0)
            out.sent += 1
            try:
                answer = methods[method](message, metadata=metadata, timeout=300)
            except grpc.RpcError as e:
                out.last = time.monotonic()
                out.errors["status"] += 1
                code = e.code().name if hasattr(e, "code") else "UNKNOWN"
                out.codes[code] = out.codes.get(code, 0) + 1
                out.error(f"{code}: {e.details() if hasattr(e, 'details') else e}")
                continue
            t = time.monotonic()
            out.last = t
            if expect and (name := proto_string_field(answer, 1)) != expect:
                out.errors["mismatch"] += 1
                out.error(f"an answer for model {name!r}, not {expect!r}")
            else:
                out.latencies.append(t - t0)

    cpu0 = time.process_time()
    threads = [threading.Thread(target=client, args=(p, out)) for p, out in zip(plans.values(), parts, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = Result("grpc")
    for part in parts:
        result.add(part)
    result.cpu_s = time.process_time() - cpu0
    return result


def run_grpc(
    target: str,
    clients: list[list[GrpcRequest]],
    app: str | None = None,
    duration_s: float | None = None,
    processes: int = 1,
    limit_s: float = RUN_LIMIT_S,
) -> Result:
    """Each client's calls, in order, through gRPC worker processes (clients dealt out among them)."""
    processes = max(1, min(processes, len(clients)))
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        commands = []
        for g in range(processes):
            path = Path(tmp) / f"plan{g}.tsv"
            lines = [
                f"{k}\t{r.method}\t{r.expect or ''}\t{base64.b64encode(r.message).decode()}"
                for k in range(g, len(clients), processes)
                for r in clients[k]
            ]
            path.write_text("\n".join(lines) + "\n")
            commands.append({"target": target, "plan": str(path), "app": app or "", "duration": duration_s})
        return _run_workers("grpc-worker", commands, "grpc", limit_s)


def describe_grpc() -> str:
    try:
        from importlib.metadata import version

        v = version("grpcio")
    except Exception:  # the version is only for the report
        v = "?"
    return f"grpcio {v} stubs (bench/loadgen.py: a thread per client, blocking calls, requests serialized beforehand)"


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("http-worker", "grpc-worker"):
        sys.exit("usage: python -m bench.loadgen http-worker|grpc-worker  (bench/loadgen.py starts them)")
    _serve(sys.argv[1])
