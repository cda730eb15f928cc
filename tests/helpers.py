"""Helpers shared by the integration tests."""

import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], bool], timeout: float = 20, interval: float = 0.1) -> bool:
    """Poll until predicate() is true (the replicas report model changes asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def tiny_args(registry: Path, replicas: int, **extra) -> dict:
    return {"registry_path": str(registry),
            "worker": {"num_replicas": replicas, "num_cpus": 0.5, "max_ongoing_requests": 8, "torch_threads": 1},
            **extra}
