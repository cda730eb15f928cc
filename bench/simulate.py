"""Trace generators and the cache policies the app is compared with, simulated.

Pure functions over traces of model indices: no server, no clock. The pool simulations replay traces
through the worker router's own placement policy (``deployments.routing.policy``) over per-replica LRU
caches, as Ray's ``@serve.multiplexed`` keeps them.
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


# -- the pool of worker replicas ----------------------------------------------------------------------


def shifting_trace(n_models: int, length: int, phases: int, s: float = 1.0, seed: int = 0) -> list[int]:
    """Zipf traffic whose popular models change at each phase (a new ranking of the models)."""
    rng = random.Random(seed)
    out: list[int] = []
    for p in range(phases):
        order = list(range(n_models))
        rng.shuffle(order)
        out += [order[k] for k in zipf_trace(n_models, length // phases, s, seed=seed + p + 1)]
    return out


def bursty_trace(n_models: int, length: int, burst: int, every: int, s: float = 1.0, seed: int = 0) -> list[int]:
    """Zipf traffic interrupted every ``every`` requests by ``burst`` requests for one model, a cold one."""
    rng = random.Random(seed)
    base = zipf_trace(n_models, length, s, seed)
    out: list[int] = []
    for start in range(0, length, every):
        out += base[start : start + every]
        out += [rng.randrange(n_models // 2, n_models)] * burst
    return out[:length]


def pool_misses(
    trace: list[int],
    replicas: int,
    slots: int,
    policy: str = "model-aware",
    seed: int = 0,
    interval_s: float = 0.1,
    half_life_s: float = 60.0,
) -> int:
    """Misses of a pool of ``replicas`` LRU caches of ``slots`` models each (Ray's LRU on each replica), one
    request at a time, ``interval_s`` apart. ``policy``: ``model-aware`` (the router's ``rank``, with its
    demand tracker) or ``ray-default`` (Ray's router: a holder, else a replica with the fewest models)."""
    from deployments.routing.policy import Copy, DemandTracker, Replica, rank

    rng = random.Random(seed)
    caches: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(replicas)]
    views = [Replica(str(k), slots=slots) for k in range(replicas)]  # rebuilt only where a request changed it
    demand = DemandTracker(half_life_s)
    misses = 0
    for i, item in enumerate(trace):
        now = i * interval_s
        if policy == "model-aware":
            target = int(rank(str(item), views, lambda m, now=now: demand.demand(m, now))[0][0])
        else:
            holders = [k for k, cache in enumerate(caches) if item in cache]
            fewest = min(len(cache) for cache in caches)
            target = rng.choice(holders or [k for k, cache in enumerate(caches) if len(cache) == fewest])
        demand.add(str(item), now)
        cache = caches[target]
        if item in cache:
            cache.move_to_end(item)
        else:
            misses += 1
            if len(cache) >= slots:
                cache.popitem(last=False)
        cache[item] = now
        views[target] = Replica(str(target), tuple(Copy(str(m), t) for m, t in cache.items()), slots=slots)
    return misses


WORKLOADS = {
    "Zipf s=0.8": lambda n, length: zipf_trace(n, length, s=0.8, seed=1),
    "Zipf s=1.0": lambda n, length: zipf_trace(n, length, s=1.0, seed=1),
    "Zipf s=1.2": lambda n, length: zipf_trace(n, length, s=1.2, seed=1),
    "shifting working set": lambda n, length: shifting_trace(n, length, phases=4, s=1.0, seed=1),
    "bursts of cold models": lambda n, length: bursty_trace(n, length, burst=50, every=500, s=1.0, seed=1),
}


def pool_report(models: int, replicas: int, slots: int, length: int) -> dict:
    """Hit ratios of each workload on a pool of ``replicas`` x ``slots``: this router's policy, Ray's default
    placement, one global LRU of the same total slots, and Belady's optimum (which knows the future)."""
    out = {}
    for name, make in WORKLOADS.items():
        trace = make(models, length)
        n = len(trace)
        out[name] = {
            "model-aware": 1 - pool_misses(trace, replicas, slots) / n,
            "ray-default": 1 - pool_misses(trace, replicas, slots, "ray-default") / n,
            "global LRU": 1 - lru_misses(trace, replicas * slots) / n,
            "Belady": 1 - belady_misses(trace, replicas * slots) / n,
        }
    return {"models": models, "replicas": replicas, "slots": slots, "requests": length, "workloads": out}


def spread_report(cases: list[tuple[int, int]], requests: int, spread_at: int) -> dict:
    """How evenly one hot model's requests spread over the replicas, by (replicas, clients): the busiest
    replica's share over the least busy one's, for this router's policy and Ray's default."""
    out = {}
    for replicas, clients in cases:
        row = {}
        for policy in ("model-aware", "ray-default"):
            served = hot_model_spread(replicas, clients, requests, policy, spread_at)
            row[policy] = {"served": served, "busiest_over_least": max(served) / max(min(served), 1)}
        out[f"{replicas} replicas, {clients} clients"] = row
    return out


def hot_model_spread(
    replicas: int,
    clients: int,
    requests: int,
    policy: str = "model-aware",
    spread_at: int = 4,
    service_s: float = 1.0,
    load_s: float = 5.0,
) -> list[int]:
    """Requests each replica served when ``clients`` closed-loop clients send ``requests`` requests for one
    model, which no replica holds at first: each replica runs one request at a time (``service_s``) and a
    load takes ``load_s``. Ray's default router keeps a model on the replica that holds it until that
    replica has max_ongoing_requests (16) in flight."""
    import heapq
    from collections import deque

    from deployments.routing.policy import Copy, DemandTracker, Knobs, Replica, rank

    holds = [False] * replicas
    busy_until = [0.0] * replicas
    finishing: list[deque[float]] = [deque() for _ in range(replicas)]  # completion times, in order
    served = [0] * replicas
    demand = DemandTracker(60.0)
    events = [(0.0, c) for c in range(clients)]  # (when a client sends its next request, client)
    for _ in range(requests):
        now, client = heapq.heappop(events)
        for queue in finishing:
            while queue and queue[0] <= now:
                queue.popleft()
        flights = [len(q) for q in finishing]
        if policy == "model-aware":
            view = [
                Replica(str(k), (Copy("m", 0.0, flights[k]),) if holds[k] else (), in_flight=flights[k])
                for k in range(replicas)
            ]
            target = int(rank("m", view, lambda m, now=now: demand.demand(m, now), Knobs(spread_at=spread_at))[0][0])
        else:
            holders = [k for k in range(replicas) if holds[k] and flights[k] < 16]
            target = holders[0] if holders else min(range(replicas), key=lambda k: flights[k])
        demand.add("m", now)
        start = max(now, busy_until[target])
        if not holds[target]:
            start += load_s
            holds[target] = True
        busy_until[target] = start + service_s
        finishing[target].append(busy_until[target])
        served[target] += 1
        heapq.heappush(events, (busy_until[target], client))
    return served
