"""What each load generator costs per request, against the running app, in one run:

    python -m bench.generator_cost                       # starts the app (serve run), as bench.run does
    python -m bench.generator_cost --app-url URL --app-grpc HOST:PORT

For GET /healthz (no model run) and POST /predict (one loaded model), at 1 and 16 clients: wrk (where
installed) and rawhttp, the benchmark's generators, and the httpx closed loop that the benchmark used
before them (an httpx.AsyncClient per client, in one process); for gRPC ModelInfer, the benchmark's
stubs (bench/loadgen.py) and the grpc.aio loop it used before. Each one's CPU per request is its
processes' CPU time from its first request to its last answer, over the requests it sent. Beside it, the
whole run's: wrk's whole process; rawhttp's and the gRPC stubs' whole run in their worker processes (the
plan read, the connections opened; the workers' start, once for many runs, left out); httpx's and
grpc.aio's whole process, its start and imports included. Each case runs in alternating rounds
(generators in turn), and the table gives the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.scenarios import MODEL_INFER, body_for, in_turn, infer_request

PREDICT = json.dumps(body_for("sentiment", {}, 0)).encode()


def _httpx_worker(url: str, method: str, path: str, clients: int, requests: int) -> None:
    """The benchmark's closed loop before bench/loadgen.py: an httpx.AsyncClient (one connection) per
    client, in one process, sending the next request when the last one is answered."""
    import httpx

    body = json.loads(PREDICT) if method == "POST" else None

    async def main() -> dict:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        ok = 0
        pool = [httpx.AsyncClient(timeout=300) for _ in range(clients)]

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal ok
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = await (client.post(url + path, json=body) if body else client.get(url + path))
                ok += r.status_code == 200

        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker(c) for c in pool))
        out = {"cpu_s": time.process_time() - cpu0, "elapsed": time.monotonic() - t0, "ok": ok}
        for c in pool:
            await c.aclose()
        return out

    print(json.dumps(asyncio.run(main())), flush=True)


def _aio_worker(target: str, clients: int, requests: int) -> None:
    """The benchmark's gRPC loop before bench/loadgen.py: grpc.aio, one channel, building each request."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    async def main() -> dict:
        ok = 0
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(infer_request("sentiment", {}, 0), timeout=300)  # connected

            async def worker() -> None:
                nonlocal ok
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    r = await stub.ModelInfer(infer_request("sentiment", {}, i), timeout=300)
                    ok += r.model_name == "sentiment"

            cpu0, t0 = time.process_time(), time.monotonic()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return {"cpu_s": time.process_time() - cpu0, "elapsed": time.monotonic() - t0, "ok": ok}

    print(json.dumps(asyncio.run(main())), flush=True)


def _subprocess(args: list[str]) -> dict:
    """One of the workers above, in a process of its own; its result and its whole CPU time."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.generator_cost", *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{args[0]} failed: {err.read().decode()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_total_s"] = usage.ru_utime + usage.ru_stime
    return result


def measure(kind: str, url: str, grpc_target: str, route: str, clients: int, n: int) -> dict:
    """One run of one generator: CPU per request (load, and whole processes), req/s, requests answered."""
    if kind in loadgen.HTTP_GENERATORS:
        method, path = route.split(" ")
        request = loadgen.Request(method, path, PREDICT if method == "POST" else b"")
        r = loadgen.run_http(loadgen.Plan(url, loadgen.spread([request] * n, clients)), kind)
        return {"cpu": r.cpu_s / n, "total": r.cpu_total_s / n, "rps": r.ok / r.elapsed, "ok": r.ok}
    if kind == "httpx":
        method, path = route.split(" ")
        r = _subprocess(["httpx-worker", url, method, path, str(clients), str(n)])
    elif kind == "grpc stubs":
        calls = [loadgen.GrpcRequest(MODEL_INFER, infer_request("sentiment", {}, 0).SerializeToString(), "sentiment")]
        res = loadgen.run_grpc(grpc_target, [calls * (n // clients)] * clients)
        return {"cpu": res.cpu_s / n, "total": res.cpu_total_s / n, "rps": res.ok / res.elapsed, "ok": res.ok}
    else:  # grpc.aio
        r = _subprocess(["aio-worker", grpc_target, str(clients), str(n)])
    return {"cpu": r["cpu_s"] / n, "total": r["cpu_total_s"] / n, "rps": r["ok"] / r["elapsed"], "ok": r["ok"]}


def compare(url: str, grpc_target: str | None, rounds: int = 3, n1: int = 200, n16: int = 400) -> list[list]:
    http = [g for g in ("wrk", "rawhttp") if g != "wrk" or loadgen.wrk_path()] + ["httpx"]
    cases = [(route, c) for route in ("GET /healthz", "POST /predict") for c in (1, 16)]
    if grpc_target:
        cases += [("gRPC ModelInfer", 1), ("gRPC ModelInfer", 16)]
    rows = []
    for route, clients in cases:
        kinds = ["grpc stubs", "grpc.aio"] if route.startswith("gRPC") else http
        n = n1 if clients == 1 else n16
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for k in range(rounds):
            for kind in in_turn(kinds, k):
                runs[kind].append(measure(kind, url, grpc_target or "", route, clients, n))
        for kind, rs in runs.items():
            med = {key: statistics.median(r[key] for r in rs) for key in ("cpu", "total", "rps")}
            answered = sum(r["ok"] for r in rs)
            rows.append([route, clients, kind, 1000 * med["cpu"], 1000 * med["total"], med["rps"], answered])
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "httpx-worker":
        url, method, path, clients, n = sys.argv[2:]
        _httpx_worker(url, method, path, int(clients), int(n))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "aio-worker":
        target, clients, n = sys.argv[2:]
        _aio_worker(target, int(clients), int(n))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app-url", help="an app already running there (else this starts one with serve run)")
    ap.add_argument("--app-grpc", help="with --app-url: its gRPC address (host:port)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = None
    if args.app_url:
        url, grpc_target = args.app_url, args.app_grpc
    else:
        from bench.peers import bench_registry, start_app

        work = Path(tempfile.mkdtemp(prefix="generator-cost-"))
        server, url, grpc_target, _ = start_app(bench_registry(work / "models", smoke=False), work, "app")
    try:
        rows = compare(url, grpc_target, args.rounds)
    finally:
        if server is not None:
            server.stop()
    print()
    print("| route | clients | generator | CPU per request, load (ms) | whole run (ms) | req/s | answered |")
    print("|---|---|---|---|---|---|---|")
    for route, c, kind, cpu, total, rps, ok in rows:
        print(f"| {route} | {c} | {kind} | {cpu:.3f} | {total:.3f} | {rps:.0f} | {ok} |")


if __name__ == "__main__":
    main()
