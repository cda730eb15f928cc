"""The benchmark: this app against the in-process floor and the seed-style server, side by side, in one run.

    make bench                          # full run (minutes), writes docs/benchmarks.md and docs/bench/*.png
    python bench/run.py --smoke --out /tmp/bench   # seconds; part of `make test`

Peers:
  * direct: the same transformers pipeline called in-process (the floor);
  * seed:   a single-process FastAPI + uvicorn server with an in-process LRU of two models (bench/seed_server.py);
  * app:    this application, started with `serve run` (or an already running one: --app-url).

Scenarios: hot path; throughput at 1/4/16/64 clients on one model and on a mix; model churn on a
Zipf trace over 8 models against LRU and Belady simulations; cold load; start-up. Variants of the app
(batching off, Ray Serve's throughput-optimized mode) are measured on the hot path and at 16 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scenarios import Run, belady_misses, closed_loop, lru_misses, median, zipf_trace  # noqa: E402
from demo.tiny_models import build_image_model, build_text_model, write_registry  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
# The app runs as `make run` starts it: Ray Serve's throughput-optimized mode.
APP_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@dataclass
class Profile:
    """How much to measure: the full run or the smoke run."""

    hot_requests: int = 200
    clients: tuple[int, ...] = (1, 4, 16, 64)
    requests_per_client: int = 24
    max_requests: int = 400  # per throughput point: the seed's mixed workload reloads models on a third of them
    churn_requests: int = 600
    cold_repeats: int = 5
    variants: bool = True


SMOKE = Profile(hot_requests=10, clients=(1, 4), requests_per_client=3, max_requests=20, churn_requests=30,
                cold_repeats=1, variants=False)


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    hot: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)  # peer -> workload -> clients -> summary
    churn: dict = field(default_factory=dict)
    cold: dict = field(default_factory=dict)
    startup: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_info() -> dict:
    import ray
    import torch
    import transformers

    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpus": os.cpu_count(), "memory_mib": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__}


# -- models and registries ------------------------------------------------------------------------

def bench_registry(folder: Path, smoke: bool) -> Path:
    """The demo models (sentiment, spam, image) plus eight churn models c0..c7.
    In a smoke run all of them are tiny models, built in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple[str, Path]] = {}
    if smoke:
        for name in ("sentiment", "spam"):
            models[name] = ("text-classification", build_text_model(folder / name, name))
        models["image"] = ("image-classification", build_image_model(folder / "image", "image"))
    else:
        for name, task in (("sentiment", "text-classification"), ("spam", "text-classification"),
                           ("image", "image-classification")):
            models[name] = (task, ROOT / "models" / name)
    for k in range(8):
        models[f"c{k}"] = ("text-classification", build_text_model(folder / f"c{k}", f"c{k}", seed=k))
    return write_registry(folder / "registry.json", models)


IMAGES = {"image": "samples/images/square.jpg"}


# -- the peers ------------------------------------------------------------------------------------

class Server:
    """A server process this run started; stopped (its whole process group) at the end."""

    def __init__(self, cmd: list[str], env: dict, log: Path) -> None:
        self.log = log.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def wait_first_prediction(url: str, model_id: str, timeout: float = 300) -> float:
    """Seconds from now until `url` answers a prediction (for start-up, measured from process start)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < deadline:
            try:
                r = c.post(f"{url}/predict", json={"model_id": model_id, "input_data": "warm up"})
                if r.status_code == 200:
                    return time.perf_counter()
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start_seed(registry: Path, logs: Path) -> tuple[Server, str]:
    port = _free_port()
    server = Server([sys.executable, "-m", "uvicorn", "bench.seed_server:app", "--port", str(port),
                     "--log-level", "warning"], {"SEED_REGISTRY": str(registry)}, logs / "seed.log")
    url = f"http://127.0.0.1:{port}"
    wait_first_prediction(url, "sentiment")
    return server, url


def start_app(registry: Path, logs: Path, name: str, batching: bool = True, env: dict | None = None
              ) -> tuple[Server, str, float]:
    """`serve run` on a config like serve_config.yaml, with the bench registry and 2 fixed worker replicas."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["registry_path"] = str(registry)
    args["worker"].pop("autoscaling", None)
    args["worker"]["num_replicas"] = 2
    if not batching:
        args["worker"]["batching"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0}
    path = logs / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    server = Server([str(Path(sys.executable).parent / "serve"), "run", str(path)], APP_ENV if env is None else env,
                    logs / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    startup = wait_first_prediction(url, "sentiment") - server.started
    return server, url, startup


# -- scenarios ------------------------------------------------------------------------------------

def direct_hot(registry: Path, n: int) -> tuple[Run, list[float]]:
    """The floor: the pipeline in this process. Also returns its from_pretrained (load) times."""
    import torch

    from deployments.runtimes import runtime_for
    from serve_app.core.registry import Registry

    torch.set_num_threads(1)  # as a worker replica runs it
    spec = Registry.from_file(registry).get("sentiment")
    runtime = runtime_for(spec, device="cpu").load()
    load_times = [runtime.load_seconds]
    run = Run()
    runtime.predict(["warm up"])
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        runtime.predict(["This movie was great!"])
        run.latencies.append(time.perf_counter() - t0)
    run.elapsed = time.perf_counter() - start
    runtime.unload()
    return run, load_times


def trivial_route(url: str, path: str, n: int) -> Run:
    """Latency of a route that runs no model: the fixed cost of the serving path."""
    run = Run()
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{url}{path}").raise_for_status()
            run.latencies.append(time.perf_counter() - t0)
    return run


def hot(url: str, n: int) -> Run:
    asyncio.run(closed_loop(url, ["sentiment"], 1, 5))  # warm
    return asyncio.run(closed_loop(url, ["sentiment"], 1, n))


def throughput(url: str, p: Profile) -> dict:
    out: dict = {}
    for workload, models in (("one model", ["sentiment"]), ("mix of 3", ["sentiment", "spam", "image"])):
        out[workload] = {}
        for c in p.clients:
            n = min(max(c * p.requests_per_client, 20), p.max_requests)
            run = asyncio.run(closed_loop(url, models, c, n, IMAGES, seed=c))
            out[workload][c] = run.summary()
    return out


def app_loads(url: str) -> int:
    return sum(m["load_count"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"])


def churn(url: str, n: int) -> dict:
    trace = zipf_trace(8, n, s=1.0, seed=1)
    replicas = len(httpx.get(f"{url}/models", timeout=60).json()["replicas"])
    for model in httpx.get(f"{url}/models", timeout=60).json()["models"]:  # every slot free, as in the simulation
        httpx.post(f"{url}/models/{model['id']}/unload", timeout=120)
    before = app_loads(url)
    with httpx.Client(timeout=120) as c:
        for item in trace:
            r = c.post(f"{url}/predict", json={"model_id": f"c{item}", "input_data": "hello"})
            r.raise_for_status()
    loads = app_loads(url) - before
    slots = 2 * replicas
    lru, opt = lru_misses(trace, slots), belady_misses(trace, slots)
    return {"requests": n, "slots": slots,
            "app": {"loads_per_1000": 1000 * loads / n, "hit_ratio": 1 - loads / n},
            "lru": {"loads_per_1000": 1000 * lru / n, "hit_ratio": 1 - lru / n},
            "belady": {"loads_per_1000": 1000 * opt / n, "hit_ratio": 1 - opt / n}}


# Innermost frames of threads that wait in C (select, futex) with no deeper Python frame.
WAITING_FRAMES = ("Thread.run", "Worker.main_loop", "_run_router_event_loop", "_run_user_code_event_loop",
                  "_worker (concurrent/futures/thread.py", "_WorkItem.run", "BaseEventLoop.run_forever",
                  "Thread._bootstrap_inner")


def profile_load(url: str, clients: int = 16, seconds: float = 10.0) -> dict:
    """py-spy samples of the proxy, ingress and worker processes while `clients` clients send requests for
    one model: how busy each process is and where its time goes (top functions by samples, idle excluded)."""
    import shutil
    import threading

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = {"proxy": "ray::ProxyActor", "ingress": "ray::ServeReplica:multimodel:Ingress",
             "worker": "ray::ServeReplica:multimodel:ModelWorker"}
    pids = {}
    for name, title in procs.items():
        found = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()
        for k, pid in enumerate(found):
            pids[f"{name} {k + 1}" if len(found) > 1 else name] = pid
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                c.post(f"{url}/predict", json={"model_id": "sentiment", "input_data": "This movie was great!"})

    rate = 100
    loaders = [threading.Thread(target=load) for _ in range(clients)]
    for loader in loaders:
        loader.start()
    outputs, recorders = {}, []
    for name, pid in pids.items():
        outputs[name] = Path(tempfile.mkstemp(suffix=".txt")[1])
        recorders.append(subprocess.Popen([pyspy, "record", "-p", pid, "-d", str(int(seconds)), "-r", str(rate),
                                           "-f", "raw", "-o", str(outputs[name]), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for r in recorders:
        r.wait(timeout=seconds + 60)
    stop.set()
    for loader in loaders:
        loader.join()
    result = {}
    for name, path in outputs.items():
        counts: dict[str, int] = {}
        busy = 0
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            leaf = stack.split(";")[-1]
            if any(w in leaf for w in WAITING_FRAMES):
                continue  # a thread parked in its event loop or pool: waiting, not working
            counts[leaf] = counts.get(leaf, 0) + int(n)
            busy += int(n)
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        result[name] = {"busy": busy / (rate * seconds), "samples": busy,
                        "top": [(frame, n / busy if busy else 0.0) for frame, n in top]}
    return result


def cold(url: str, repeats: int) -> list[float]:
    times = []
    with httpx.Client(timeout=300) as c:
        for _ in range(repeats):
            c.post(f"{url}/models/sentiment/unload")
            t0 = time.perf_counter()
            c.post(f"{url}/predict", json={"model_id": "sentiment", "input_data": "cold"}).raise_for_status()
            times.append(time.perf_counter() - t0)
    return times


# -- the run --------------------------------------------------------------------------------------

def run(out: Path, smoke: bool, app_url: str | None = None, registry: Path | None = None) -> Report:
    """Measure every peer and write the report. With `app_url`, the app running there must serve
    `registry` (see bench_registry); otherwise this run starts it with `serve run`."""
    p = SMOKE if smoke else Profile()
    report = Report(machine=machine_info())
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    logs = work / "logs"
    logs.mkdir()
    registry = registry or bench_registry(work / "models", smoke)
    servers: list[Server] = []
    try:
        print("direct: in-process pipeline", flush=True)
        direct, load_times = direct_hot(registry, p.hot_requests)
        report.hot["direct"] = direct.summary()
        report.cold["direct_load_s"] = median(load_times)

        print("seed-style server", flush=True)
        seed, seed_url = start_seed(registry, logs)
        servers.append(seed)
        report.hot["seed"] = hot(seed_url, p.hot_requests).summary()
        report.overhead["seed: GET /models (no model run)"] = trivial_route(seed_url, "/models", p.hot_requests).summary()
        report.throughput["seed"] = throughput(seed_url, p)
        seed.stop()
        servers.remove(seed)

        print("app", flush=True)
        if app_url:
            url = app_url
        else:
            app, url, report.startup["app_s"] = start_app(registry, logs, "app")
            servers.append(app)
        report.hot["app"] = hot(url, p.hot_requests).summary()
        report.overhead["app: GET /healthz (proxy + ingress, no model run)"] = trivial_route(
            url, "/healthz", p.hot_requests).summary()
        report.throughput["app"] = throughput(url, p)
        report.churn = churn(url, p.churn_requests)
        report.cold["app_s"] = median(cold(url, p.cold_repeats))
        if not smoke and not app_url:
            print("profile at 16 clients", flush=True)
            report.profile = profile_load(url)

        if p.variants and not app_url:
            app.stop()
            servers.remove(app)
            for name, kwargs in (("batching off", {"batching": False}),
                                 ("standard Ray Serve mode (proxy actor)", {"env": {}})):
                print(f"app variant: {name}", flush=True)
                variant, vurl, startup = start_app(registry, logs, name.split()[0], **kwargs)
                servers.append(variant)
                c16 = asyncio.run(closed_loop(vurl, ["sentiment"], 16, min(16 * p.requests_per_client, p.max_requests),
                                              seed=16))
                report.variants[name] = {"hot": hot(vurl, p.hot_requests).summary(), "16 clients": c16.summary(),
                                         "startup_s": startup}
                variant.stop()
                servers.remove(variant)
    finally:
        for s in servers:
            s.stop()
    write_report(report, out, smoke)
    return report


def write_report(report: Report, out: Path, smoke: bool) -> None:
    from bench.report import render

    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report.__dict__, indent=1, default=str))
    (out / "benchmarks.md").write_text(render(report, out, smoke))
    print(f"wrote {out / 'benchmarks.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--smoke", action="store_true", help="a few requests per scenario, tiny models")
    ap.add_argument("--app-url", help="measure an app already running there instead of starting one")
    ap.add_argument("--render", type=Path, help="only render the report again from this benchmarks.json")
    args = ap.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        for scenario in ("throughput",):  # JSON turned the client counts into strings
            for peer in data[scenario].values():
                for workload, series in peer.items():
                    peer[workload] = {int(k): v for k, v in series.items()}
        write_report(Report(**data), args.out, smoke=False)
        return
    run(args.out, args.smoke, args.app_url)


if __name__ == "__main__":
    main()
