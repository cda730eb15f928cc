"""Benchmark scenarios: the load each peer gets, over HTTP, and over gRPC for the app's Open Inference
Protocol service.

Every scenario measures its peers side by side in the same run; figures are percentiles and ratios,
never a single wall-clock number.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from bench.simulate import belady_misses, lru_misses, zipf_trace
from serve_app.core.paths import PROJECT_ROOT

IMAGES = {"image": "samples/images/square.jpg"}
"""Image inputs of the image models, by model id."""


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
        return {
            "n": len(self.latencies),
            "errors": self.errors,
            "p50_ms": self.pct(50) * 1000,
            "p99_ms": self.pct(99) * 1000,
            "rps": self.rps,
        }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def body_for(model_id: str, images: dict[str, str], i: int) -> dict:
    if model_id in images:
        return {"model_id": model_id, "input_data": images[model_id]}
    texts = [
        "This movie was great!",
        "Win a free iPhone now!",
        "See you at lunch tomorrow.",
        "The service was slow and the food was cold.",
    ]
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


Send = Callable[[int, int, str], Awaitable[bool]]
"""Client k sends request i for a model; True when the model asked for answered it."""


async def _drive(plan: list[str], clients: int, send: Send) -> Run:
    run = Run()
    queue: asyncio.Queue = asyncio.Queue()
    for i, m in enumerate(plan):
        queue.put_nowait((i, m))

    async def worker(k: int):
        while True:
            try:
                i, m = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            if await send(k, i, m):
                run.latencies.append(time.perf_counter() - t0)
            else:
                run.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    run.elapsed = time.perf_counter() - start
    return run


async def closed_loop(
    url: str,
    models: list[str],
    clients: int,
    requests: int,
    images: dict[str, str] | None = None,
    seed: int = 0,
    api: str = "native",
) -> Run:
    """`clients` concurrent clients, each sending its next request when the last one is answered, over HTTP:
    the native API (POST /predict) or the Open Inference Protocol (`api="v2"`, POST /v2/models/m/infer)."""
    images = IMAGES if images is None else images
    rng = random.Random(seed)
    plan = [rng.choice(models) for _ in range(requests)]
    # Each client has its own connection, in an httpx client of its own, as separate users have. One shared
    # pool of `clients` connections cost the generator, which shares the CPUs with the server it measures,
    # 10.1 against 3.0 ms of CPU per request at 64 clients (httpcore scans its pool's connections and
    # waiting requests on every request): the server then lacked that CPU and was measured 35 % slower.
    async with contextlib.AsyncExitStack() as stack:
        pool = [await stack.enter_async_context(httpx.AsyncClient(timeout=300)) for _ in range(clients)]

        async def send(k: int, i: int, m: str) -> bool:
            client = pool[k]
            if api == "v2":
                r = await client.post(f"{url}/v2/models/{m}/infer", json=v2_body(m, images, i))
                return r.status_code == 200 and r.json()["model_name"] == m
            r = await client.post(f"{url}/predict", json=body_for(m, images, i))
            return r.status_code == 200 and r.json()["model_id"] == m

        return await _drive(plan, clients, send)


async def grpc_closed_loop(
    target: str,
    models: list[str],
    clients: int,
    requests: int,
    app: str | None = None,
    images: dict[str, str] | None = None,
    seed: int = 0,
) -> Run:
    """The same closed loop over gRPC: ModelInfer of inference.GRPCInferenceService, through one channel
    (HTTP/2 multiplexes the clients' calls), with Serve's `application` metadata when `app` is given."""
    images = IMAGES if images is None else images
    rng = random.Random(seed)
    plan = [rng.choice(models) for _ in range(requests)]
    metadata = (("application", app),) if app else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def send(k: int, i: int, m: str) -> bool:
            try:
                response = await stub.ModelInfer(infer_request(m, images, i), metadata=metadata, timeout=300)
            except grpc.aio.AioRpcError:
                return False
            return response.model_name == m

        return await _drive(plan, clients, send)


def hot(url: str, n: int, model: str = "sentiment") -> Run:
    """One client, one loaded model: the latency of the serving path."""
    asyncio.run(closed_loop(url, [model], 1, 5))  # warm
    return asyncio.run(closed_loop(url, [model], 1, n))


def in_turn(urls: dict[str, str], k: int) -> list[str]:
    """The servers' names for turn ``k`` of a side-by-side measurement: each once, the first one changing
    every turn, so that neither is always measured right after the other."""
    return list(urls) if k % 2 == 0 else list(reversed(urls))


def hot_side_by_side(urls: dict[str, str], n: int, rounds: int = 10, model: str = "sentiment") -> dict[str, Run]:
    """The hot path of servers that run at once, by name: `n` requests each, in alternating rounds. This
    machine's speed drifts by tens of percent within a minute (one in-process forward pass measured 10 to
    17 ms), so servers measured minutes apart would compare the drift, not the servers."""
    for url in urls.values():
        asyncio.run(closed_loop(url, [model], 1, 5))  # warm
    runs = {name: Run() for name in urls}
    for k in range(rounds):
        size = n // rounds + (k < n % rounds)
        for name in in_turn(urls, k):
            part = asyncio.run(closed_loop(urls[name], [model], 1, size))
            runs[name].latencies += part.latencies
            runs[name].errors += part.errors
            runs[name].elapsed += part.elapsed
    return runs


PROTOCOLS = ("REST /predict", "REST /v2 infer", "gRPC ModelInfer")


def protocols(
    url: str, grpc_target: str, app: str | None, hot_n: int, clients_n: int, model: str = "sentiment"
) -> dict:
    """The app over each protocol, one after the other in this run, on one loaded model: the hot path (one
    client) and 16 clients. Protocol -> {"hot": summary, "16 clients": summary}."""
    loads = {
        "REST /predict": lambda c, n: closed_loop(url, [model], c, n, seed=c),
        "REST /v2 infer": lambda c, n: closed_loop(url, [model], c, n, seed=c, api="v2"),
        "gRPC ModelInfer": lambda c, n: grpc_closed_loop(grpc_target, [model], c, n, app=app, seed=c),
    }
    out = {}
    for name in PROTOCOLS:
        asyncio.run(loads[name](1, 5))  # warm: connections, and the model on its replica
        out[name] = {
            "hot": asyncio.run(loads[name](1, hot_n)).summary(),
            "16 clients": asyncio.run(loads[name](16, clients_n)).summary(),
        }
    return out


def trivial_route(url: str, path: str, n: int) -> Run:
    """Latency of a route that runs no model: the fixed cost of the serving path."""
    run = Run()
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{url}{path}").raise_for_status()
            run.latencies.append(time.perf_counter() - t0)
    return run


WORKLOADS = {
    "one model": ["sentiment"],
    "two hot models": ["sentiment", "spam"],
    "mix of 3": ["sentiment", "spam", "image"],
}


def throughput(urls: dict[str, str], clients: tuple[int, ...], requests_per_client: int, max_requests: int) -> dict:
    """Closed-loop throughput of servers that run at once, by name, for each workload at each client count:
    name -> workload -> clients -> summary. Each point is measured on every server back to back, in turns
    (first one server first, then the other), for the same reason as ``hot_side_by_side``: measured
    minutes apart, the seed-style server's figure at 16 clients on one model was 56.2 req/s in one run and
    29.8 in the next."""
    out: dict = {name: {} for name in urls}
    turn = 0
    for workload, models in WORKLOADS.items():
        for c in clients:
            n = min(max(c * requests_per_client, 20), max_requests)
            for name in in_turn(urls, turn):
                out[name].setdefault(workload, {})[c] = asyncio.run(
                    closed_loop(urls[name], models, c, n, seed=c)
                ).summary()
            turn += 1
    return out


def app_loads(url: str) -> int:
    return sum(m["load_count"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"])


def churn(url: str, n: int) -> dict:
    """A Zipf trace over the churn models c0..c7, one request at a time, against the simulations of one
    LRU cache of the same total slots and of Belady's optimum."""
    trace = zipf_trace(8, n, s=1.0, seed=1)
    listing = httpx.get(f"{url}/models", timeout=60).json()
    for model in listing["models"]:  # every slot free, as in the simulation
        httpx.post(f"{url}/models/{model['id']}/unload", timeout=120)
    before = app_loads(url)
    with httpx.Client(timeout=120) as c:
        for item in trace:
            c.post(f"{url}/predict", json={"model_id": f"c{item}", "input_data": "hello"}).raise_for_status()
    loads = app_loads(url) - before
    slots = 2 * len(listing["replicas"])
    lru, opt = lru_misses(trace, slots), belady_misses(trace, slots)
    return {
        "requests": n,
        "slots": slots,
        "app": {"loads_per_1000": 1000 * loads / n, "hit_ratio": 1 - loads / n},
        "lru": {"loads_per_1000": 1000 * lru / n, "hit_ratio": 1 - lru / n},
        "belady": {"loads_per_1000": 1000 * opt / n, "hit_ratio": 1 - opt / n},
    }


def cold(url: str, repeats: int, model: str = "sentiment") -> list[float]:
    """Request-to-answer times for a model unloaded everywhere just before."""
    times = []
    with httpx.Client(timeout=300) as c:
        for _ in range(repeats):
            c.post(f"{url}/models/{model}/unload")
            t0 = time.perf_counter()
            c.post(f"{url}/predict", json={"model_id": model, "input_data": "cold"}).raise_for_status()
            times.append(time.perf_counter() - t0)
    return times
