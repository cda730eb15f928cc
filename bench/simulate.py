"""Trace generators and the cache policies the app is compared with, simulated.

Pure functions over traces of model indices: no server, no clock.
"""

from __future__ import annotations

import random
from collections import OrderedDict


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
