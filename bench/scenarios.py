"""Benchmark scenarios: the load each peer gets, over HTTP, and over gRPC for the app's Open Inference
Protocol service.

Every scenario measures its peers side by side in the same run, in alternating rounds; figures are
percentiles and ratios, never a single wall-clock number. The load comes from ``bench/loadgen.py``'s
generators (wrk, or its own raw-socket one; gRPC stubs of their own process), which run in processes of
their own and report the CPU they cost; httpx only makes the calls that set a scenario up (unloading
models, reading the app's load counts).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tritonclient.grpc import service_pb2 as pb

from bench import cpu, loadgen
from bench.simulate import belady_misses, lru_misses, zipf_trace
from serve_app.core.paths import PROJECT_ROOT

IMAGES = {"image": "samples/images/square.jpg"}
"""Image inputs of the image models, by model id."""


def nearest_rank(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile of sorted values by the nearest-rank method: the smallest value that at least
    ``q`` % of them do not exceed (p50 of 1, 2, 3, 4: 2; p99 of 100 values: the 99th); NaN for none."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


@dataclass
class Run:
    """Latencies (seconds) and outcome counts of one load run, or of the rounds of one point: then the
    latencies of all its rounds, and the rate of each round (the point's rate is their median)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    sent: int = 0
    generator: str = ""
    cpu_s: float = 0.0  # the load generator's CPU time over the run
    round_rps: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)  # kind or status code -> count
    first_error: str = ""
    server_cpu_s: dict[str, float] = field(default_factory=dict)  # the server's CPU time over the run, by role

    @classmethod
    def of(cls, result: loadgen.Result) -> Run:
        if result.answered_or_lost != result.sent:
            raise RuntimeError(f"{result.generator}: {result.sent} sent, {result.answered_or_lost} accounted for")
        return cls(
            latencies=list(result.latencies),
            errors=result.failed,
            elapsed=result.elapsed,
            sent=result.sent,
            generator=result.generator,
            cpu_s=result.cpu_s,
            error_kinds={k: v for k, v in {**result.errors, **result.codes}.items() if v and k != "status"},
            first_error=result.first_error,
        )

    def add_round(self, part: Run) -> None:
        self.latencies += part.latencies
        self.errors += part.errors
        self.elapsed += part.elapsed
        self.sent += part.sent
        self.cpu_s += part.cpu_s
        self.generator = self.generator or part.generator
        self.round_rps.append(part.rps)
        for k, v in part.error_kinds.items():
            self.error_kinds[k] = self.error_kinds.get(k, 0) + v
        self.first_error = self.first_error or part.first_error
        for k, v in part.server_cpu_s.items():
            self.server_cpu_s[k] = self.server_cpu_s.get(k, 0.0) + v

    def pct(self, q: float) -> float:
        return nearest_rank(sorted(self.latencies), q)

    @property
    def mean(self) -> float:
        """The mean latency, in seconds (means add up over the parts of a request; percentiles do not)."""
        return statistics.fmean(self.latencies) if self.latencies else float("nan")

    @property
    def rps(self) -> float:
        if self.round_rps:
            return median(self.round_rps)
        return len(self.latencies) / self.elapsed if self.elapsed else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / self.sent if self.sent and self.generator else float("nan")

    def summary(self) -> dict:
        return {
            "n": len(self.latencies),
            "sent": self.sent,
            "errors": self.errors,
            "p50_ms": self.pct(50) * 1000,
            "p99_ms": self.pct(99) * 1000,
            "mean_ms": self.mean * 1000,
            "rps": self.rps,
            "rounds": max(1, len(self.round_rps)),
            "generator": self.generator,
            "cpu_ms_per_request": self.cpu_ms_per_request,
            "error_kinds": self.error_kinds,
            "first_error": self.first_error,
            # the server's CPU per request sent, by the role of its processes (bench/cpu.py), where measured
            "server_cpu_ms_per_request": {k: 1000 * v / self.sent for k, v in self.server_cpu_s.items()}
            if self.sent
            else {},
            "server_cpus": sum(self.server_cpu_s.values()) / self.elapsed
            if self.server_cpu_s and self.elapsed
            else None,
        }


def rounds_of(parts: list[Run]) -> Run:
    run = Run()
    for part in parts:
        run.add_round(part)
    return run


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


TEXTS = {
    "ner": [
        "Alice Smith flew from Paris to Berlin to meet the board of Acme Corp.",
        "Bob Jones works for Globex in London.",
        "Maria Garcia moved from Madrid to Toronto last spring.",
        "The Initech office in Austin hired Peter Gibbons.",
    ],
}
"""Texts of the models that need their own (entities to find), by model id; the others get ``TEXT``."""

TEXT = [
    "This movie was great!",
    "Win a free iPhone now!",
    "See you at lunch tomorrow.",
    "The service was slow and the food was cold.",
]


def body_for(model_id: str, images: dict[str, str], i: int) -> dict:
    if model_id in images:
        return {"model_id": model_id, "input_data": images[model_id]}
    texts = TEXTS.get(model_id, TEXT)
    return {"model_id": model_id, "input_data": texts[i % len(texts)]}


def input_bytes(model_id: str, images: dict[str, str], i: int) -> bytes:
    """The one input of a request, as the Open Inference Protocol carries it: text as UTF-8, an image as
    its file's bytes."""
    data = body_for(model_id, images, i)["input_data"]
    return (PROJECT_ROOT / data).read_bytes() if model_id in images else data.encode()


def v2_body(model_id: str, images: dict[str, str], i: int) -> dict:
    """The REST Open Inference Protocol's JSON body (an image in base64)."""
    raw = input_bytes(model_id, images, i)
    data = base64.b64encode(raw).decode() if model_id in images else raw.decode()
    return {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [data]}]}


def infer_request(model_id: str, images: dict[str, str], i: int) -> pb.ModelInferRequest:
    """The gRPC ModelInfer request, its input in raw_input_contents as tritonclient.grpc sends it."""
    raw = input_bytes(model_id, images, i)
    request = pb.ModelInferRequest(model_name=model_id)
    request.inputs.add(name="input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    return request


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def predict_request(model_id: str, images: dict[str, str], i: int, api: str = "native") -> loadgen.Request:
    """Request i for a model: POST /predict (the native API), or the Open Inference Protocol over REST
    (`api="v2"`, POST /v2/models/m/infer); a good answer names the model."""
    if api == "v2":
        body = json.dumps(v2_body(model_id, images, i)).encode()
        return loadgen.Request("POST", f"/v2/models/{model_id}/infer", body, ("model_name", model_id))
    body = json.dumps(body_for(model_id, images, i)).encode()
    return loadgen.Request("POST", "/predict", body, ("model_id", model_id))


def closed_loop(
    url: str,
    models: list[str],
    clients: int,
    requests: int,
    images: dict[str, str] | None = None,
    seed: int = 0,
    api: str = "native",
) -> Run:
    """`clients` concurrent clients, each sending its next request when the last one is answered, over HTTP:
    the native API (POST /predict) or the Open Inference Protocol (`api="v2"`, POST /v2/models/m/infer).
    Request i (its model drawn at random) goes to client i % clients, each client on a connection of its
    own, as separate users have; the load generator is loadgen's chosen one (wrk or rawhttp)."""
    images = IMAGES if images is None else images
    rng = random.Random(seed)
    plan = [rng.choice(models) for _ in range(requests)]
    reqs = [predict_request(m, images, i, api) for i, m in enumerate(plan)]
    return Run.of(loadgen.run_http(loadgen.Plan(url, loadgen.spread(reqs, clients))))


def grpc_closed_loop(
    target: str,
    models: list[str],
    clients: int,
    requests: int,
    app: str | None = None,
    images: dict[str, str] | None = None,
    seed: int = 0,
) -> Run:
    """The same closed loop over gRPC: ModelInfer of inference.GRPCInferenceService, through one channel
    (HTTP/2 multiplexes the clients' calls) of a generator process of its own, a thread per client, each
    request serialized before the run, with Serve's `application` metadata when `app` is given."""
    images = IMAGES if images is None else images
    rng = random.Random(seed)
    plan = [rng.choice(models) for _ in range(requests)]
    calls = [
        loadgen.GrpcRequest(MODEL_INFER, infer_request(m, images, i).SerializeToString(), m) for i, m in enumerate(plan)
    ]
    clients = max(1, min(clients, len(calls)))
    return Run.of(loadgen.run_grpc(target, [calls[k::clients] for k in range(clients)], app=app))


def hot(url: str, n: int, model: str = "sentiment", rounds: int = 3) -> Run:
    """One client, one loaded model: the latency of the serving path, in `rounds` runs."""
    closed_loop(url, [model], 1, 5)  # warm
    return rounds_of([closed_loop(url, [model], 1, size) for size in split(n, rounds)])


def split(n: int, rounds: int) -> list[int]:
    """`n` requests over `rounds` rounds, as evenly as can be (never an empty round)."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (k < n % rounds) for k in range(rounds)]


def in_turn(names, k: int) -> list[str]:
    """The names (of servers, protocols) for turn ``k`` of a side-by-side measurement: each once, the first
    one changing every turn (a rotation), so that none is always measured right after another."""
    names = list(names)
    j = k % len(names)
    return names[j:] + names[:j]


def warm(urls: dict[str, str], model: str = "sentiment") -> None:
    """A few requests for the model to each server: loaded, connections open."""
    for url in urls.values():
        closed_loop(url, [model], 1, 5)


def hot_side_by_side(
    urls: dict[str, str],
    n: int,
    rounds: int = 10,
    model: str = "sentiment",
    warmed: bool = False,
    local: dict[str, Callable[[int], Run]] | None = None,
) -> dict[str, Run]:
    """The hot path of servers that run at once, by name: `n` requests each, in alternating rounds (after
    ``warm``, unless ``warmed``), and of the ``local`` peers, each a function that runs a round of so many
    calls in this process (the in-process floor: ``peers.Direct.round``), in turn with them. This machine's
    speed drifts by tens of percent within a minute (one in-process forward pass measured 10 to 17 ms), so
    peers measured minutes apart would compare the drift, not the peers."""
    local = local or {}
    if not warmed:
        warm(urls, model)
    runs = {name: Run() for name in [*urls, *local]}
    for k, size in enumerate(split(n, rounds)):
        for name in in_turn(runs, k):
            runs[name].add_round(local[name](size) if name in local else closed_loop(urls[name], [model], 1, size))
    return runs


ROUNDS = 3
"""Rounds of each throughput and protocol point, in turns across its peers; a point's rate is the median
of its rounds'."""


PROTOCOLS = ("REST /predict", "REST /v2 infer", "gRPC ModelInfer")


def protocols(
    url: str,
    grpc_target: str,
    app: str | None,
    hot_n: int,
    clients_n: int,
    model: str = "sentiment",
    rounds: int = ROUNDS,
) -> dict:
    """The app over each protocol on one loaded model: the hot path (one client, `hot_n` requests over the
    rounds) and 16 clients (`clients_n` requests a round), each point in rounds that take the protocols in
    turn. Protocol -> {"hot": summary, "16 clients": summary}."""
    loads = {
        "REST /predict": lambda c, n: closed_loop(url, [model], c, n, seed=c),
        "REST /v2 infer": lambda c, n: closed_loop(url, [model], c, n, seed=c, api="v2"),
        "gRPC ModelInfer": lambda c, n: grpc_closed_loop(grpc_target, [model], c, n, app=app, seed=c),
    }
    for name in PROTOCOLS:
        loads[name](1, 5)  # warm: connections, and the model on its replica
    runs: dict[str, dict[str, Run]] = {name: {"hot": Run(), "16 clients": Run()} for name in PROTOCOLS}
    for k, size in enumerate(split(hot_n, max(rounds, 1))):
        for name in in_turn(PROTOCOLS, k):
            runs[name]["hot"].add_round(loads[name](1, size))
    for k in range(rounds):
        for name in in_turn(PROTOCOLS, k):
            runs[name]["16 clients"].add_round(loads[name](16, clients_n))
    return {name: {point: run.summary() for point, run in points.items()} for name, points in runs.items()}


FLOOR_HOP_REQUEST = ("/floor/hop", json.dumps({"model_id": "floor", "input_data": "This movie was great!"}).encode())
"""The request to Serve's floor that crosses to a second deployment (bench/serve_floor.py): it echoes the body."""


def trivial_side_by_side(
    routes: dict[str, tuple[str, str] | tuple[str, str, bytes]], n: int, rounds: int = ROUNDS
) -> dict[str, Run]:
    """Latency of routes that run no model (the fixed cost of each serving path), by name: (server URL,
    path) each for a GET, or (server URL, path, body) for a POST whose answer names the model "floor" (Serve's
    floor: FLOOR_HOP_REQUEST); one client, `n` requests each over rounds that take the routes in turn."""
    runs = {name: Run() for name in routes}
    for k, size in enumerate(split(n, rounds)):
        for name in in_turn(routes, k):
            url, path, *body = routes[name]
            method = ("POST", path, body[0], ("model_id", "floor")) if body else ("GET", path)
            request = loadgen.Request(*method)
            plan = loadgen.Plan(url, [[request] * size])
            runs[name].add_round(Run.of(loadgen.run_http(plan)))
    return runs


WORKLOADS = {
    "one model": ["sentiment"],
    "two hot models": ["sentiment", "spam"],
    "mix of 3": ["sentiment", "spam", "image"],
}


def throughput(
    urls: dict[str, str],
    clients: tuple[int, ...],
    requests_per_client: int,
    max_requests: int,
    min_requests: int = 20,
    rounds: int = ROUNDS,
    processes: dict[str, tuple[int, str]] | None = None,
) -> dict:
    """Closed-loop throughput of servers that run at once, by name, for each workload at each client count:
    name -> workload -> clients -> summary. Each point is measured in `rounds` rounds, each round on every
    server back to back, in turns (first one server first, then the other), for the same reason as
    ``hot_side_by_side``: measured minutes apart, the seed-style server's figure at 16 clients on one model
    was 56.2 req/s in one run and 29.8 in the next. A point's rate is the median of its rounds'.
    ``processes``: by server name, the root of its process tree and the role of that root process; the
    server's CPU per request is measured over each of its rounds, by role (bench/cpu.py). The readings
    bracket the whole round, the load generator's start and end included, while ``server_cpus`` divides by
    the load's own time: both lean a little high, by what the servers do while idle for that long."""
    out: dict = {name: {} for name in urls}
    turn = 0
    for workload, models in WORKLOADS.items():
        for c in clients:
            n = min(max(c * requests_per_client, min_requests), max_requests)
            runs = {name: Run() for name in urls}
            for _ in range(rounds):
                for name in in_turn(urls, turn):
                    tree = (processes or {}).get(name)
                    before = cpu.snapshot(*tree) if tree else None
                    part = closed_loop(urls[name], models, c, n, seed=c)
                    if tree:
                        part.server_cpu_s = cpu.spent(before, cpu.snapshot(*tree))
                    runs[name].add_round(part)
                turn += 1
            for name, run in runs.items():
                out[name].setdefault(workload, {})[c] = run.summary()
    return out


def app_loads(url: str) -> int:
    return sum(m["load_count"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"])


def settled(
    read: Callable[[], Any],
    what: str,
    quiet_s: float,
    ready: Callable[[Any], bool] = lambda _: True,
    every_s: float = 0.5,
    limit_s: float = 30.0,
) -> Any:
    """``read()`` once ``ready`` with it and it has not changed for ``quiet_s`` (read every ``every_s``). GET
    /models answers from a snapshot up to 1 s old (the ingress's FRESH_S) of what the worker replicas report
    every 0.5 s (the router's stats_period_s), so what the app counts lags behind what it did."""
    value, since = read(), time.monotonic()
    deadline = since + limit_s
    while time.monotonic() < deadline:
        time.sleep(every_s)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s and ready(value):
            return value
    raise RuntimeError(f"{what} did not settle within {limit_s}s")


def settled_loads(url: str) -> int:
    """The app's load count once it has not changed for 2 s (``settled``): read at once after a trace, it
    missed the trace's last loads: 2 to 4 of 178 on the 600 requests of `make bench` (0.3 to 0.7 points of hit
    ratio), and every one of a smoke run's."""
    return settled(lambda: app_loads(url), "the app's load count", quiet_s=2.0)


TIMING_COUNTERS = ("requests", "batches", "predict_seconds", "model_seconds")
"""The worker replicas' counters (GET /models: replicas[].counters) that the hot path's breakdown reads."""


def worker_timings(url: str) -> dict[str, float]:
    """The app's worker replicas' timing counters, summed over the replicas."""
    return {k: sum(r.get("counters", {}).get(k, 0) for r in replica_reports(url)) for k in TIMING_COUNTERS}


def settled_worker_timings(url: str, requests: int = 0) -> dict:
    """``worker_timings`` once they count at least ``requests`` requests and read the same twice in a row
    (``settled``)."""
    return settled(
        lambda: worker_timings(url),
        "the worker replicas' counters",
        quiet_s=2.0,  # GET /models answers from a snapshot up to about 1.5 s old (replicas report every 0.5 s)
        ready=lambda timings: timings["requests"] >= requests,
    )


def seed_timings(url: str) -> dict[str, float]:
    """The seed-style server's count and time of its model calls (GET /models)."""
    answer = httpx.get(f"{url}/models", timeout=60).json()
    return {"model_calls": answer["model_calls"], "model_seconds": answer["model_seconds"]}


def hot_breakdown(app: Run, seed: Run, app_counted: dict, seed_counted: dict) -> dict:
    """Where a hot-path request's time goes, in means per request (means add up; percentiles do not), from the
    client's latencies and what the servers counted over the same requests (the difference of their counters
    before and after): in the app, the worker replica's time on the request (its predict call) and, within it,
    the model's (forward pass and encoding: model_seconds); in the seed-style server, the model's."""
    ms = lambda seconds, count: 1000 * seconds / count if count else float("nan")  # noqa: E731
    app_e2e, seed_e2e = 1000 * app.mean, 1000 * seed.mean
    requests = app_counted["requests"]
    worker = ms(app_counted["predict_seconds"], requests)
    model = ms(app_counted["model_seconds"], requests)
    seed_model = ms(seed_counted["model_seconds"], seed_counted["model_calls"])
    return {
        "app": {
            "requests": len(app.latencies),
            "counted": requests,
            "batches": app_counted["batches"],
            "end_to_end_ms": app_e2e,
            "model_ms": model,
            "worker_own_ms": worker - model,
            "outside_worker_ms": app_e2e - worker,
        },
        "seed": {
            "requests": len(seed.latencies),
            "counted": seed_counted["model_calls"],
            "end_to_end_ms": seed_e2e,
            "model_ms": seed_model,
            "outside_model_ms": seed_e2e - seed_model,
        },
    }


def churn(url: str, n: int) -> dict:
    """A Zipf trace over the churn models c0..c7, sent in trace order by one client (one connection), against
    the simulations of one LRU cache of the same total slots and of Belady's optimum. The app's loads are its
    replicas' own load counts (GET /models) before and after, once settled."""
    trace = zipf_trace(8, n, s=1.0, seed=1)
    listing = httpx.get(f"{url}/models", timeout=60).json()
    for model in listing["models"]:  # every slot free, as in the simulation
        httpx.post(f"{url}/models/{model['id']}/unload", timeout=120)
    before = settled_loads(url)
    reqs = [
        loadgen.Request(
            "POST", "/predict", json.dumps({"model_id": f"c{m}", "input_data": "hello"}).encode(), ("model_id", f"c{m}")
        )
        for m in trace
    ]
    run = Run.of(loadgen.run_http(loadgen.Plan(url, [reqs])))
    if run.errors or run.sent != n:
        raise RuntimeError(f"churn: {run.sent} of {n} requests sent, {run.errors} failed: {run.first_error}")
    loads = settled_loads(url) - before
    slots = 2 * len(listing["replicas"])
    lru, opt = lru_misses(trace, slots), belady_misses(trace, slots)
    return {
        "requests": n,
        "slots": slots,
        "app": {
            "loads_per_1000": 1000 * loads / n,
            "hit_ratio": 1 - loads / n,
            "sent": run.sent,
            "n": len(run.latencies),
            "errors": run.errors,
            "generator": run.generator,
            "cpu_ms_per_request": run.cpu_ms_per_request,
        },
        "lru": {"loads_per_1000": 1000 * lru / n, "hit_ratio": 1 - lru / n},
        "belady": {"loads_per_1000": 1000 * opt / n, "hit_ratio": 1 - opt / n},
    }


def cold(url: str, repeats: int, model: str = "sentiment") -> Run:
    """Request-to-answer times for a model unloaded everywhere just before: one request each, from the load
    generator."""
    run = Run()
    for _ in range(repeats):
        httpx.post(f"{url}/models/{model}/unload", timeout=300)
        request = loadgen.Request(
            "POST", "/predict", json.dumps({"model_id": model, "input_data": "cold"}).encode(), ("model_id", model)
        )
        part = Run.of(loadgen.run_http(loadgen.Plan(url, [[request]])))
        if part.errors:
            raise RuntimeError(f"cold: the request for {model} failed: {part.first_error}")
        run.add_round(part)
    return run


# -- the mixed-size fleet ----------------------------------------------------------------------------------------

EVICTION_COUNTERS = (
    "evicted_by_router",
    "router_victim_not_lru",
    "evicted_by_lru",
    "evicted_for_memory",
    "evicted_in_use",
    "waited_for_memory",
    "refused_over_budget",
)
"""The worker replicas' counters of evictions and memory waits (GET /models), summed, that a trace changes."""

MEMORY_SLACK = 0.15
"""The mixed-size target: no replica's resident memory above its budget plus its baseline, plus 15 %."""


def replica_reports(url: str) -> list[dict]:
    return httpx.get(f"{url}/models", timeout=60).json()["replicas"]


def eviction_counters(reports: list[dict]) -> dict[str, int]:
    return {k: sum(r.get("counters", {}).get(k, 0) for r in reports) for k in EVICTION_COUNTERS}


class MemoryWatch:
    """While a trace runs: each worker replica's own report of its memory (GET /models: replicas[].memory) every
    ``every_s`` (its resident memory is up to a report period old), and the resident memory of the replicas'
    processes (``pids``, where this run can see them: /proc VmRSS); at the end each process's peak resident
    memory over its life (VmHWM), which no sample misses."""

    def __init__(self, url: str, pids: list[int], every_s: float = 0.25) -> None:
        self.url, self.pids, self.every_s = url, list(pids), every_s
        self.replicas: dict[str, dict] = {}
        self.rss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        from bench.peers import process_memory

        for r in replica_reports(self.url):
            memory = r.get("memory") or {}
            seen = self.replicas.setdefault(r["replica_id"], {"peak_resident_bytes": 0, "peak_used_bytes": 0})
            seen["budget_bytes"], seen["baseline_bytes"] = memory.get("budget_bytes"), memory.get("baseline_bytes")
            seen["peak_resident_bytes"] = max(seen["peak_resident_bytes"], memory.get("resident_bytes") or 0)
            seen["peak_used_bytes"] = max(seen["peak_used_bytes"], memory.get("used_bytes") or 0)
        for pid in self.pids:
            self.rss[pid] = max(self.rss.get(pid, 0), process_memory(pid).get("VmRSS", 0))

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(httpx.HTTPError):
                self._sample()

    def __enter__(self) -> MemoryWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        from bench.peers import process_memory

        limits = [
            r["budget_bytes"] + r["baseline_bytes"]
            for r in self.replicas.values()
            if r.get("budget_bytes") is not None and r.get("baseline_bytes") is not None
        ]
        limit = max(limits) if limits else None  # budget + baseline: the replica's memory_bytes, on every replica
        processes = [
            {"pid": pid, "peak_resident_bytes": process_memory(pid).get("VmHWM"), "sampled_resident_bytes": rss}
            for pid, rss in self.rss.items()
        ]
        peaks = [r["peak_resident_bytes"] for r in self.replicas.values()]
        peaks += [p["peak_resident_bytes"] or 0 for p in processes]
        return {
            "replicas": self.replicas,
            "processes": processes,
            "budget_plus_baseline_bytes": limit,
            "limit_bytes": None if limit is None else int(limit * (1 + MEMORY_SLACK)),
            "peak_bytes": max(peaks, default=None),
        }


def split_misses(
    trace: list[int], models: list[str], latencies: list[float], loads: dict[str, int]
) -> tuple[list[float], list[float], list[float]]:
    """The latencies of a trace's hits and of its misses, sorted, and for each model requested both as a hit and
    as a miss the gap between its fastest miss and its slowest hit. One client sent the trace, so the
    latencies are in trace order; of each model's requests, the slowest, as many as the replicas loaded it, are
    its misses (a load takes longer than a hit of the same model: the gaps show by how much)."""
    if len(latencies) != len(trace):
        raise ValueError(f"{len(latencies)} latencies for a trace of {len(trace)}")
    by_model: dict[str, list[float]] = {}
    for m, latency in zip(trace, latencies, strict=True):
        by_model.setdefault(models[m], []).append(latency)
    hits, misses, gaps = [], [], []
    for model, values in by_model.items():
        ordered = sorted(values)
        k = max(0, len(ordered) - loads.get(model, 0))
        hits += ordered[:k]
        misses += ordered[k:]
        if 0 < k < len(ordered):
            gaps.append(ordered[k] - ordered[k - 1])
    return sorted(hits), sorted(misses), gaps


def unload_all(url: str, models: list[str]) -> dict[str, dict]:
    """Unload the models from every replica, at once (a thread each), and return each one's entry as the
    answer of its unload gives it: fresh, the ingress asking each replica directly (GET /models answers from a
    snapshot up to about 1.5 s old), with its load count over the replicas and its measured size."""
    from concurrent.futures import ThreadPoolExecutor

    def unload(model: str) -> dict:
        r = httpx.post(f"{url}/models/{model}/unload", timeout=120)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(max(1, min(16, len(models)))) as pool:
        return dict(zip(models, pool.map(unload, models), strict=True))


def sized_trace(url: str, models: list[str], n: int, pids: list[int] = (), seed: int = 2) -> dict:
    """A Zipf (s = 1) trace of `n` requests over the mixed-size fleet `models` (most requested first), sent in
    trace order by one client after every model was unloaded (every slot and every byte free, as in the
    simulation). Measured in the app: its hits and the bytes it loaded, from its replicas' own load counts and
    measured sizes (fresh: the answers of unloads before and after the trace); their peak resident memory
    (``MemoryWatch``, against each replica's budget and baseline); the latency of its misses
    (``split_misses``). Simulated on the same trace, with the sizes the replicas measured: the router's policy
    over the app's replicas and budgets, Ray's default router, and the global byte-LRU and GDSF peers with the
    replicas' total bytes and count cap (``simulate.sized_peers``)."""
    from bench.simulate import sized_peers

    trace = zipf_trace(len(models), n, s=1.0, seed=seed)
    every = [m["id"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"]]
    before = unload_all(url, every)  # every slot and byte free; the load counts, fresh
    counters_before = eviction_counters(replica_reports(url))
    reqs = [
        loadgen.Request(
            "POST",
            "/predict",
            json.dumps({"model_id": models[m], "input_data": "hello world"}).encode(),
            ("model_id", models[m]),
        )
        for m in trace
    ]
    with MemoryWatch(url, pids) as watch:
        run = Run.of(loadgen.run_http(loadgen.Plan(url, [reqs])))
    if run.errors or run.sent != n:
        raise RuntimeError(f"mixed sizes: {run.sent} of {n} requests sent, {run.errors} failed: {run.first_error}")
    reports = replica_reports(url)  # the replicas' counters, a report period old at most (not fresh)
    after = unload_all(url, models)  # each model's fresh load count and measured size
    sizes = {m: after[m].get("size_bytes") or 0 for m in models}
    counters = eviction_counters(reports)
    loads = {m: after[m]["load_count"] - before[m]["load_count"] for m in models}
    misses = sum(loads.values())
    requested = sum(sizes[models[m]] for m in trace)
    loaded = sum(loads[m] * sizes[m] for m in models)
    hit_lat, miss_lat, gaps = split_misses(trace, models, run.latencies, loads)
    budgets = [r["memory"]["budget_bytes"] for r in reports]
    slots = min((r.get("slots", 2) for r in reports), default=2)
    simulated = None
    if budgets and all(b is not None for b in budgets):
        simulated = sized_peers(
            trace, [sizes[m] for m in models], len(budgets), slots, min(budgets), total_bytes=sum(budgets)
        )

    def ms(values: list[float], q: float) -> float:
        return 1000 * nearest_rank(values, q)

    return {
        "requests": n,
        "models": models,
        "sizes": sizes,
        "distinct": len(set(trace)),
        "budgets": budgets,
        "baselines": [r["memory"]["baseline_bytes"] for r in reports],
        "slots": slots,
        "app": {
            "hit_ratio": 1 - misses / n,
            "hits": n - misses,
            "loads": loads,
            "misses": misses,
            "loads_per_1000": 1000 * misses / n,
            "requested_bytes": requested,
            "loaded_bytes": loaded,
            "byte_hit_ratio": 1 - loaded / requested if requested else float("nan"),
            "bytes_per_1000": 1000 * loaded / n,
            "sent": run.sent,
            "n": len(run.latencies),
            "errors": run.errors,
            "generator": run.generator,
            "cpu_ms_per_request": run.cpu_ms_per_request,
            "p50_ms": run.pct(50) * 1000,
            "p99_ms": run.pct(99) * 1000,
            "miss_p50_ms": ms(miss_lat, 50),
            "miss_p99_ms": ms(miss_lat, 99),
            "hit_p50_ms": ms(hit_lat, 50),
            "least_gap_ms": 1000 * min(gaps) if gaps else float("nan"),
            "counters": {k: counters[k] - counters_before[k] for k in EVICTION_COUNTERS},
        },
        "memory": watch.result(),
        "simulated": simulated,
    }


# -- tasks: embeddings and entities against their users' single-process servers -----------------------------------


def tasks(
    urls: dict[str, str],
    clients: tuple[int, ...],
    requests_per_client: int,
    max_requests: int,
    min_requests: int,
    hot_n: int,
    rounds: int = ROUNDS,
) -> dict:
    """The app against the single-process task peers (``bench/task_peer.py``), both running at once, by name in
    ``urls`` ("peer", "app"): embeddings (``embed``) in a closed loop at each client count, each point in
    ``rounds`` rounds that take the servers in turn (req/s: the median of the rounds'); token classification
    (``ner``) on the hot path, one client, in ten alternating rounds (``hot_side_by_side``)."""
    for url in urls.values():  # warm: the model on its replicas at the highest concurrency, connections
        closed_loop(url, ["embed"], max(clients), 2 * max(clients))
    embeddings: dict = {name: {} for name in urls}
    turn = 0
    for c in clients:
        n = min(max(c * requests_per_client, min_requests), max_requests)
        runs = {name: Run() for name in urls}
        for _ in range(rounds):
            for name in in_turn(urls, turn):
                runs[name].add_round(closed_loop(urls[name], ["embed"], c, n, seed=c))
            turn += 1
        for name, run in runs.items():
            embeddings[name][c] = run.summary()
    ner = hot_side_by_side(urls, hot_n, model="ner")
    return {"embeddings": embeddings, "ner": {name: run.summary() for name, run in ner.items()}}
