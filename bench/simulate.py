"""Benchmark scenarios: load generators and the cache simulations they are compared with.

Every scenario measures its peers side by side in the same run; figures are
percentiles and ratios, never a single wall-clock number.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx


@dataclass
class Run:
    """Latencies (seconds) and outcome counts of one load run."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else float("nan")

    def summary(self) -> dict[str, float]:
        return {"n": len(self.latencies), "errors": self.errors, "p50_ms": self.pct(50) * 1000,
                "p99_ms": self.pct(99) * 1000, "rps": self.rps}


def body_for(model_id: str, images: dict[str, str], i: int) -> dict:
    if model_id in images:
        return {"model_id": model_id, "input_data": images[model_id]}
    texts = ["This movie was great!", "Win a free iPhone now!", "See you at lunch tomorrow.",
             "The service was slow and the food was cold."]
    return {"model_id": model_id, "input_data": texts[i % len(texts)]}


async def closed_loop(url: str, models: list[str], clients: int, requests: int,
                      images: dict[str, str] | None = None, seed: int = 0) -> Run:
    """`clients` concurrent clients, each sending its next request when the last one is answered."""
    images = images or {}
    rng = random.Random(seed)
    plan = [rng.choice(models) for _ in range(requests)]
    run = Run()
    queue: asyncio.Queue = asyncio.Queue()
    for i, m in enumerate(plan):
        queue.put_nowait((i, m))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker():
            while True:
                try:
                    i, m = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                r = await client.post(f"{url}/predict", json=body_for(m, images, i))
                if r.status_code == 200 and r.json()["model_id"] == m:
                    run.latencies.append(time.perf_counter() - t0)
                else:
                    run.errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        run.elapsed = time.perf_counter() - start
    return run


def zipf_trace(n_models: int, length: int, s: float = 1.0, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(n_models)]
    return rng.choices(range(n_models), weights=weights, k=length)


def lru_misses(trace: list[int], slots: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for item in trace:
        if item in cache:
            cache.move_to_end(item)
            continue
        misses += 1
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[item] = None
    return misses


def belady_misses(trace: list[int], slots: int) -> int:
    """Belady's optimal policy: on a miss, evict the item whose next use is farthest away."""
    next_use: list[int] = [0] * len(trace)
    last: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = last.get(trace[i], len(trace) + i)
        last[trace[i]] = i
    cache: dict[int, int] = {}  # item -> index of its next use
    misses = 0
    for i, item in enumerate(trace):
        if item not in cache:
            misses += 1
            if len(cache) >= slots:
                victim = max(cache, key=cache.get)
                del cache[victim]
        cache[item] = next_use[i]
    return misses


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
