"""Trace generators and the cache policies the app is compared with, simulated.

Pure functions over traces of model indices: no server, no clock. The pool simulations replay traces
through the worker router's own placement policy (``deployments.routing.policy``) over per-replica LRU
caches, as Ray's ``@serve.multiplexed`` keeps them.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


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


MB = 1_000_000


def model_sizes(
    n_models: int, seed: int = 0, low: int = 20 * MB, high: int = 2000 * MB, span: float = 2.5
) -> list[int]:
    """Heavy-tailed model sizes in bytes, one per model index: log-normal, its median the geometric mean of
    ``low`` and ``high`` (200 MB for 20 MB and 2 GB), ``low`` and ``high`` ``span`` standard deviations below and
    above it, clipped to them. Drawn independently of the models' popularity (their index in a trace)."""
    rng = random.Random(seed)
    mu = (math.log(low) + math.log(high)) / 2
    sigma = (math.log(high) - math.log(low)) / (2 * span)
    return [int(min(high, max(low, rng.lognormvariate(mu, sigma)))) for _ in range(n_models)]


@dataclass
class CacheRun:
    """What a trace did to a cache (or a pool of them): hits, and bytes requested and loaded. A request's
    bytes are its model's size; a miss loads them."""

    requests: int = 0
    hits: int = 0
    requested_bytes: int = 0
    loaded_bytes: int = 0
    peak_bytes: list[int] = field(default_factory=list)  # per cache: the most bytes it held at once
    peak_copies: list[int] = field(default_factory=list)  # per cache: the most models it held at once
    router_evictions: int = 0  # pool only: copies evicted because the router named them (RouteHint.evict)
    lru_evictions: int = 0  # pool only: copies a replica evicted by LRU (by count, then by bytes)

    def record(self, size: int, hit: bool) -> None:
        self.requests += 1
        self.hits += hit
        self.requested_bytes += size
        self.loaded_bytes += 0 if hit else size

    def held(self, cache: int, sizes: Sequence[int]) -> None:
        """Note what cache ``cache`` holds now (the sizes of its models)."""
        self.peak_bytes[cache] = max(self.peak_bytes[cache], sum(sizes))
        self.peak_copies[cache] = max(self.peak_copies[cache], len(sizes))

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def byte_hit_ratio(self) -> float:
        """The share of the requested bytes that were in the cache: 1 - loaded / requested."""
        return 1 - self.loaded_bytes / self.requested_bytes if self.requested_bytes else float("nan")

    @property
    def bytes_per_1000(self) -> float:
        """Bytes loaded per 1,000 requests."""
        return 1000 * self.loaded_bytes / self.requests if self.requests else float("nan")

    def summary(self) -> dict:
        return {
            "hit_ratio": self.hit_ratio,
            "byte_hit_ratio": self.byte_hit_ratio,
            "bytes_per_1000": self.bytes_per_1000,
            "requests": self.requests,
            "hits": self.hits,
            "requested_bytes": self.requested_bytes,
            "loaded_bytes": self.loaded_bytes,
        }


def _too_large(sizes: Sequence[int], budget: int) -> None:
    if max(sizes, default=0) > budget:
        raise ValueError(f"a model of {max(sizes)} bytes never fits a cache of {budget} bytes")


def pool_run(
    trace: Sequence[int],
    replicas: int,
    slots: int,
    sizes: Sequence[int] | None = None,
    budget: int | None = None,
    policy: str = "model-aware",
    seed: int = 0,
    interval_s: float = 0.1,
    half_life_s: float = 60.0,
) -> CacheRun:
    """A pool of ``replicas`` worker replicas replaying a trace one request at a time, ``interval_s`` apart,
    as the app runs it: each replica holds at most ``slots`` models (Ray's LRU cap) and, with a ``budget``,
    at most that many bytes of them (``sizes[m]``: model m's bytes; without sizes, every model 0 bytes).

    ``policy``: ``model-aware`` is the router's own pure policy (``deployments.routing.policy``): ``rank``
    with the model's size, over replicas with their budget and copies with their sizes, and its demand
    tracker (the app's default half-life). On a miss with a budget the router names the victims
    (``policy.eviction``, the least worth that frees a slot and the bytes) and the replica evicts them; without a
    budget, Ray's LRU takes the least recently used copy (the policy's ``eviction`` agrees). ``ray-default``
    is Ray's router: a holder, else a replica with the fewest models, which evicts by LRU, by count then by
    bytes (no victims named). Either way the replica then makes room as the app's does: by count (Ray's LRU),
    then by bytes (the least recently used), counted in ``lru_evictions``; with the router's victims and exact
    sizes none are needed."""
    from deployments.routing.policy import Copy, DemandTracker, Replica, eviction, rank, worth_of

    size_of = (lambda m: sizes[m]) if sizes is not None else (lambda m: 0)
    if budget is not None and sizes is not None:
        _too_large([sizes[m] for m in set(trace)], budget)
    rng = random.Random(seed)
    caches: list[OrderedDict[int, float]] = [OrderedDict() for _ in range(replicas)]  # model -> last used, LRU first
    views = [Replica(str(k), slots=slots, budget=budget) for k in range(replicas)]  # rebuilt where a request changed it
    demand = DemandTracker(half_life_s)
    run = CacheRun(peak_bytes=[0] * replicas, peak_copies=[0] * replicas)
    for i, item in enumerate(trace):
        now = i * interval_s
        size = size_of(item)
        victims: tuple = ()
        if policy == "model-aware":
            wanted = lambda m, now=now: demand.demand(m, now)  # noqa: E731
            target = int(rank(str(item), views, wanted, size=size)[0][0])
            if budget is not None and item not in caches[target]:  # the router's victims, as its RouteHint names them
                victims = eviction(views[target], str(item), size, worth_of(views, wanted)) or ()
        else:
            holders = [k for k, cache in enumerate(caches) if item in cache]
            fewest = min(len(cache) for cache in caches)
            target = rng.choice(holders or [k for k, cache in enumerate(caches) if len(cache) == fewest])
        demand.add(str(item), now)
        cache = caches[target]
        hit = item in cache
        if hit:
            cache.move_to_end(item)
        else:
            for victim in victims:
                del cache[int(victim.model_id)]
                run.router_evictions += 1
            while len(cache) >= slots or (budget is not None and sum(map(size_of, cache)) + size > budget):
                cache.popitem(last=False)  # Ray's LRU by count; the replica's own room-making by bytes
                run.lru_evictions += 1
        cache[item] = now
        run.record(size, hit)
        run.held(target, [size_of(m) for m in cache])
        views[target] = Replica(
            str(target), tuple(Copy(str(m), t, size=size_of(m)) for m, t in cache.items()), slots=slots, budget=budget
        )
    return run


def byte_lru(trace: Sequence[int], sizes: Sequence[int], capacity: int, max_copies: int) -> CacheRun:
    """One global cache of ``capacity`` bytes and at most ``max_copies`` models: a miss evicts the least recently
    used models until both hold."""
    _too_large([sizes[m] for m in set(trace)], capacity)
    cache: OrderedDict[int, None] = OrderedDict()
    run = CacheRun(peak_bytes=[0], peak_copies=[0])
    used = 0
    for item in trace:
        hit = item in cache
        if hit:
            cache.move_to_end(item)
        else:
            while len(cache) >= max_copies or used + sizes[item] > capacity:
                old, _ = cache.popitem(last=False)
                used -= sizes[old]
            cache[item] = None
            used += sizes[item]
        run.record(sizes[item], hit)
        run.held(0, [sizes[m] for m in cache])
    return run


def gdsf(trace: Sequence[int], sizes: Sequence[int], capacity: int, max_copies: int) -> CacheRun:
    """One global cache of ``capacity`` bytes and at most ``max_copies`` models under Greedy-Dual-Size-Frequency
    (Cherkasova, 1998), cost 1 a load: a model's priority is L + F / S (F: its requests since it was loaded, S:
    its size); a miss evicts the lowest priority until both limits hold (ties: the least recently used), and L
    becomes the priority of the last model evicted, which ages what stays."""
    _too_large([sizes[m] for m in set(trace)], capacity)
    priority: dict[int, float] = {}
    freq: dict[int, int] = {}
    last: dict[int, int] = {}
    run = CacheRun(peak_bytes=[0], peak_copies=[0])
    used, aging = 0, 0.0
    for i, item in enumerate(trace):
        size = sizes[item]
        hit = item in priority
        if hit:
            freq[item] += 1
        else:
            while len(priority) >= max_copies or used + size > capacity:
                victim = min(priority, key=lambda m: (priority[m], last[m]))
                aging = priority.pop(victim)
                del freq[victim]
                used -= sizes[victim]
            freq[item] = 1
            used += size
        priority[item] = aging + freq[item] / (size / MB)
        last[item] = i
        run.record(size, hit)
        run.held(0, [sizes[m] for m in priority])
    return run


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
    demand tracker) or ``ray-default`` (Ray's router: a holder, else a replica with the fewest models).
    The count alone: ``pool_run`` without sizes or budgets."""
    run = pool_run(trace, replicas, slots, policy=policy, seed=seed, interval_s=interval_s, half_life_s=half_life_s)
    return run.requests - run.hits


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


SIZE_LOW, SIZE_HIGH = 20 * MB, 2000 * MB
"""The simulated models' sizes at scale: log-normal from 20 MB to 2 GB (``model_sizes``, median 200 MB)."""
SIZED_BUDGET = SIZE_HIGH + SIZE_LOW
"""Each simulated replica's budget at scale: the largest model and the smallest fit together, as in the app's
mixed-size fleet each replica's budget fits one large model and one small one."""

SIZED_POLICIES = ("model-aware", "ray-default", "global byte-LRU", "global GDSF")


def sized_peers(
    trace: Sequence[int],
    sizes: Sequence[int],
    replicas: int,
    slots: int,
    budget: int | None,
    with_pool: bool = True,
    total_bytes: int | None = None,
) -> dict:
    """Each policy on one trace of models with sizes, by name (``SIZED_POLICIES``): the pool under this router's
    policy and under Ray's default router (``pool_run``: ``replicas`` x ``slots``, each within ``budget``
    bytes), and one global cache with the pool's total bytes and total count cap (``replicas`` x ``slots``),
    under byte-LRU and under GDSF; each policy's ``CacheRun.summary``. Also the bounds that hold for every one
    of them: ``Belady (count)``, the optimum of one cache of the total count cap alone (no policy that keeps at
    most that many models, in one cache or spread over replicas, bytes or not, hits more), and ``compulsory``,
    what one miss per distinct model leaves (hit ratio and byte hit ratio); ``total``: the global peers' bytes
    and count cap. ``total_bytes``: the pool's bytes, where its replicas' budgets differ (``budget``: the least
    of them, which the simulated pool uses on every replica)."""
    n = len(trace)
    total = total_bytes if total_bytes is not None else None if budget is None else replicas * budget
    capacity = total if total is not None else sum(sizes[m] for m in set(trace))  # no budget: the bytes never bind
    out: dict = {"total": {"bytes": capacity, "copies": replicas * slots}}
    if with_pool:
        out["model-aware"] = pool_run(trace, replicas, slots, sizes, budget).summary()
        out["ray-default"] = pool_run(trace, replicas, slots, sizes, budget, policy="ray-default").summary()
    out["global byte-LRU"] = byte_lru(trace, sizes, capacity, replicas * slots).summary()
    out["global GDSF"] = gdsf(trace, sizes, capacity, replicas * slots).summary()
    distinct = set(trace)
    requested = sum(sizes[m] for m in trace)
    out["Belady (count)"] = {"hit_ratio": 1 - belady_misses(list(trace), replicas * slots) / n}
    out["compulsory"] = {
        "hit_ratio": 1 - len(distinct) / n,
        "byte_hit_ratio": 1 - sum(sizes[m] for m in distinct) / requested if requested else float("nan"),
    }
    return out


def sized_pool_report(
    models: int, replicas: int, slots: int, length: int, budget: int = SIZED_BUDGET, seed: int = 1
) -> dict:
    """Each workload's trace over ``models`` models of heavy-tailed sizes (``model_sizes``) on a pool of
    ``replicas`` x ``slots`` within ``budget`` bytes each, and the global peers of the same total bytes and
    count cap (``sized_peers``): hit ratio, byte hit ratio and bytes loaded per 1,000 requests."""
    sizes = model_sizes(models, seed=seed, low=SIZE_LOW, high=SIZE_HIGH)
    ordered = sorted(sizes)
    return {
        "models": models,
        "replicas": replicas,
        "slots": slots,
        "requests": length,
        "budget_bytes": budget,
        "sizes": {
            "low": SIZE_LOW,
            "high": SIZE_HIGH,
            "min": ordered[0],
            "median": ordered[len(ordered) // 2],
            "mean": sum(sizes) / len(sizes),
            "max": ordered[-1],
        },
        "workloads": {
            name: sized_peers(make(models, length), sizes, replicas, slots, budget) for name, make in WORKLOADS.items()
        },
    }


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
