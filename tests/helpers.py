"""Helpers shared by the integration tests."""

import re
import time
from collections.abc import Callable
from pathlib import Path

API_KEY = "test-key-4f9c2a"  # the keys of the 'limits' test app
ADMIN_KEY = "test-admin-key-93be01"


def wait_for(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.1) -> bool:
    """Poll until predicate() is true (the replicas report model changes asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


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


def tiny_args(registry: Path, replicas: int, **extra) -> dict:
    return {
        "registry_path": str(registry),
        "auth": {"mode": "off"},
        "worker": {"num_replicas": replicas, "num_cpus": 0.5, "max_ongoing_requests": 8, "torch_threads": 1},
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
