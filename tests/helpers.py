"""Helpers shared by the tests."""

import asyncio
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

API_KEY = "test-key-4f9c2a"  # the keys of the 'limits' test app, which reads them from MMS_API_KEY / MMS_ADMIN_KEY
ADMIN_KEY = "test-admin-key-93be01"

MODEL_ROOTS = ["models", str(Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve())]
"""The model roots (args.model_roots) of the tests' apps: the project's models/ and the folder pytest makes its
temporary folders in, where the tests build their tiny models."""

EVENTUALLY_S = 120.0
"""How long a test waits for something the app does asynchronously (a replica reporting a load, Ray
exporting a metric) before it fails. It bounds a hang; it measures nothing: no test asserts that anything
is fast."""


def wait_for(predicate: Callable[[], bool], timeout: float = EVENTUALLY_S, interval: float = 0.1) -> bool:
    """Poll until predicate() is true (the replicas report model changes asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def settled(read: Callable[[], float], interval: float = 3.0) -> float:
    """A value the app reports asynchronously (a metric Ray exports every second), once two reads
    `interval` apart agree: what earlier requests added has arrived."""
    value = read()
    for _ in range(int(EVENTUALLY_S / interval)):
        time.sleep(interval)
        value, previous = read(), value
        if value == previous:
            return value
    raise AssertionError(f"{read} never settled")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims the given size: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include the given ones."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def built_on_the_loopback(args):
    """``build_app(args)`` as Serve listening on 127.0.0.1 (serve_config.yaml's) builds it, with no Serve running:
    the builder would otherwise judge an app with auth off by the address serve.run would start one on (every
    interface, in config/serve.env's HAProxy mode)."""
    from unittest import mock

    from serve_app.app import build_app
    from serve_app.core import ray_internals

    with mock.patch.object(ray_internals, "serve_http_host", lambda default: "127.0.0.1"):
        return build_app(args)


def live_registry(*specs):
    """A replica's live registry serving these ModelSpecs (unit tests of the ingress and the worker)."""
    from serve_app.core.live_registry import LiveRegistry, registry_user_config

    live = LiveRegistry()
    live.apply(registry_user_config({"models": [s.model_dump(mode="json") for s in specs]}, origin="test"))
    return live


def tiny_args(registry: Path, replicas: int, **extra) -> dict:
    worker = {"num_replicas": replicas, "num_cpus": 0.5, "max_ongoing_requests": 8, "torch_threads": 1}
    worker.update(extra.pop("worker", {}))
    return {
        "registry_path": str(registry),
        "auth": {"mode": "off"},
        "model_roots": MODEL_ROOTS,
        "worker": worker,
        **extra,
    }


def replica_pids(app: str, deployment: str = "ModelWorker") -> dict[str, int]:
    """Replica id -> PID of the running replicas of a deployment, from Serve's controller."""
    from serve_app.core import ray_internals

    replicas = ray_internals.serve_instance_details()["applications"][app]["deployments"][deployment]["replicas"]
    return {r["replica_id"]: r["pid"] for r in replicas if r["state"] == "RUNNING"}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def replicas(client: httpx.Client, url: str) -> list[dict]:
    """Every worker replica of the app at ``url``: its id, node, models and counters (GET /models)."""
    return client.get(f"{url}/models").json()["replicas"]


class Background:
    """Threads that each run ``step(client, i)`` in a loop until stopped, keeping every result in order of
    completion and every exception: a thread that fails is a test failure, not a silent stop."""

    def __init__(self, step: Callable[[httpx.Client, int], object], threads: int, headers: dict | None = None):
        self.results: list = []
        self.errors: list[BaseException] = []
        self._step, self._headers = step, headers or {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        try:
            with httpx.Client(timeout=EVENTUALLY_S, headers=self._headers) as c:
                while not self._stop.is_set():
                    result = self._step(c, i)
                    with self._lock:
                        self.results.append(result)
                        self._done.notify_all()
        except BaseException as e:
            with self._lock:
                self.errors.append(e)
                self._done.notify_all()

    def wait_until(self, done: int) -> None:
        """Block until at least ``done`` steps have completed (or a thread failed)."""
        with self._lock:
            self._done.wait_for(lambda: len(self.results) >= done or self.errors, timeout=EVENTUALLY_S)
        assert not self.errors, self.errors
        assert len(self.results) >= done, f"only {len(self.results)} of {done} steps in {EVENTUALLY_S}s"

    def __enter__(self) -> "Background":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=EVENTUALLY_S)
        assert not any(t.is_alive() for t in self._threads), "a traffic thread did not stop"
        assert not self.errors, self.errors


def inference_result(spec, rows: list):
    """The data plane's result for a request whose model answered ``rows`` (one per input, in its task's form)."""
    from deployments.ingress.dataplane import InferenceResult
    from serve_app.core.tasks import TaskCatalog

    task = TaskCatalog.load().task_of(spec)
    return InferenceResult(spec=spec, task=task, outputs=task.output.encode(rows), count=len(rows))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.005) -> None:
    """Wait, stepping the event loop, until ``condition()`` holds (a TimeoutError fails the test instead of
    hanging it)."""

    async def poll():
        while not condition():
            await asyncio.sleep(interval_s)

    await asyncio.wait_for(poll(), timeout_s)


# -- protobuf's wire form, for messages no client library would build ---------------------------------------


def pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_field(number: int, payload: bytes = b"") -> bytes:
    """A length-delimited protobuf field: the wire form the tests build messages of millions of fields in."""
    return pb_varint(number << 3 | 2) + pb_varint(len(payload)) + payload


def pb_parameters(count: int, number: int = 4) -> bytes:
    """``count`` entries of a parameters map (field ``number``), each an int64 parameter of its own key."""
    one = pb_varint(2 << 3) + b"\x01"  # InferParameter.int64_param = 1
    return b"".join(pb_field(number, pb_field(1, b"p%d" % i) + pb_field(2, one)) for i in range(count))
