"""The peers the benchmark measures, each serving the same model files:

* direct: the transformers pipeline called in this process (the floor);
* seed:   a single-process FastAPI + uvicorn server with an in-process LRU of two models
          (``bench/seed_server.py``);
* tasks:  single-process FastAPI + uvicorn servers of the embedding and entity models as their users serve
          them: sentence-transformers' ``encode`` and transformers' token-classification pipeline
          (``bench/task_peer.py``);
* app:    this application, started with ``serve run`` in the environment ``make run`` uses, over HTTP
          and over gRPC (the Open Inference Protocol's service).

And the mixed-size fleet the memory budget is measured on (``build_fleet``): models of three sizes, built
offline into the run's folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import yaml

from bench import cpu
from bench.scenarios import Run, body_for
from demo.tiny_models import (
    build_bert,
    build_image_model,
    build_text_model,
    build_token_model,
    labels_for,
    write_registry,
)
from serve_app.core.paths import PROJECT_ROOT
from serve_app.devtools import free_port, no_haproxy_left, own_fixed_ports, serve_env
from serve_app.launch import descendants


def bench_registry(folder: Path, smoke: bool) -> Path:
    """The demo models (sentiment, spam, image, embed, ner) plus eight churn models c0..c7. In a smoke run all
    of them are tiny models, built in seconds (``embed``: a tiny BERT used as feature-extraction; ``ner``: a
    tiny BERT token classifier), and the registry also holds the smoke run's mixed-size fleet (``build_fleet``),
    which the app must allow (``SMOKE_APP``)."""
    folder.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple[str, Path]] = {}
    if smoke:
        for name in ("sentiment", "spam"):
            models[name] = ("text-classification", build_text_model(folder / name, name))
        models["image"] = ("image-classification", build_image_model(folder / "image", "image"))
        models["embed"] = ("feature-extraction", build_text_model(folder / "embed", "embed", seed=11))
        models["ner"] = ("token-classification", build_token_model(folder / "ner", "ner"))
    else:
        for name, task in (
            ("sentiment", "text-classification"),
            ("spam", "text-classification"),
            ("image", "image-classification"),
            ("embed", "feature-extraction"),
            ("ner", "token-classification"),
        ):
            models[name] = (task, PROJECT_ROOT / "models" / name)
    for k in range(8):
        models[f"c{k}"] = ("text-classification", build_text_model(folder / f"c{k}", f"c{k}", seed=k))
    path = write_registry(folder / "registry.json", models)
    if smoke:
        add_entries(path, build_fleet(folder / "fleet", smoke=True).entries)
    return path


def add_entries(registry: Path, entries: list[dict]) -> Path:
    """Add registry entries to a registry file."""
    data = json.loads(registry.read_text())
    data["models"] += entries
    registry.write_text(json.dumps(data, indent=1))
    return registry


# -- the mixed-size fleet ------------------------------------------------------------------------------------

MB = 1_000_000

FLEET = (
    ("f0", "medium"),
    ("f1", "large"),
    ("f2", "small"),
    ("f3", "small"),
    ("f4", "large"),
    ("f5", "medium"),
    ("f6", "small"),
    ("f7", "medium"),
    ("f8", "small"),
)
"""The mixed-size fleet, most requested first (a Zipf trace's ranks): nine models of three sizes, the sizes
mixed over the ranks, so that the two most requested models (a large one among them) fit a replica's budget
together and the next large one does not fit beside either of them."""

FLEET_SHAPES = {"small": (256, 8), "medium": (512, 8), "large": (1024, 9)}
"""``make bench``'s fleet: random-initialised BERT classifiers of these hidden sizes and layers (four times the
hidden size in each feed-forward layer, as BERT has), about 25 MB, 100 MB and 450 MB of weights. Their
weights mean nothing (sizing only); a prediction reads every one of them, and their activations stay small
beside their weights, as a trained model's do."""

SMOKE_FLEET_SIZES = {"small": 25 * MB, "medium": 300 * MB, "large": 450 * MB}
"""The smoke run's fleet: models that declare these sizes and allocate nothing (``bench/sized_runtime.py``). The
medium is larger than ``make bench``'s (about 25, 100 and 450 MB), so that the budgets between large + small
and large + medium are a window wide enough for a baseline not measured first (``SMOKE_MEMORY_BYTES``)."""

SMOKE_MEMORY_BYTES = 1_200_000_000
"""The smoke app's ``worker.memory_bytes``: with a replica baseline of 450 to 725 MB (563 MB on the machine
this was written on), its budget fits one large model and one small one, not one large and one medium."""

SMOKE_APP = {"runtime_modules": ["bench.sized_runtime"], "worker": {"memory_bytes": SMOKE_MEMORY_BYTES}}
"""What the smoke run's app needs beside the bench registry: its fleet's runtime allowed, and a memory budget."""


def read_bench_registry(path: Path):
    """A bench registry as the peers read it: the smoke fleet's runtime module allowed (``SMOKE_APP``)."""
    from serve_app.core.registry import Registry
    from serve_app.core.tasks import TaskCatalog

    catalog = TaskCatalog.load(runtime_modules=SMOKE_APP["runtime_modules"], model_roots=["models", str(path.parent)])
    return Registry.from_file(path, catalog)


class Fleet(NamedTuple):
    entries: list[dict]  # the registry entries, most requested first
    sizes: dict[str, int]  # model id -> its bytes, as built (its weights file) or declared
    kinds: dict[str, str]  # model id -> small, medium or large

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def of(self, kind: str) -> int:
        """The largest model of a kind (bytes)."""
        return max(size for m, size in self.sizes.items() if self.kinds[m] == kind)

    def budget_window(self) -> tuple[int, int]:
        """The budgets that fit one large model and one small one, and not one large and one medium: [low, high)."""
        return self.of("large") + self.of("small"), self.of("large") + min(
            size for m, size in self.sizes.items() if self.kinds[m] == "medium"
        )

    def budget_target(self) -> int:
        """The middle of the budget window."""
        low, high = self.budget_window()
        return (low + high) // 2


def build_sized_model(folder: Path, model_id: str, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random-initialised BERT text classifier of ``hidden`` units and ``layers`` layers (4 x ``hidden`` in each
    feed-forward layer, a head per 64 units), with the tiny models' vocabulary (``demo.tiny_models``); its weights
    take about 48 x hidden^2 bytes a layer."""
    return build_bert(
        folder,
        "BertForSequenceClassification",
        labels_for(model_id),
        seed,
        hidden=hidden,
        layers=layers,
        heads=hidden // 64,
        intermediate=4 * hidden,
    )


def build_fleet(folder: Path, smoke: bool) -> Fleet:
    """The mixed-size fleet (``FLEET``), built offline into ``folder``: in ``make bench`` random-initialised BERT
    classifiers of the shapes ``FLEET_SHAPES`` (their sizes: their weights files); in a smoke run, entries of
    ``bench.sized_runtime:DeclaredSize`` that declare ``SMOKE_FLEET_SIZES``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, sizes, kinds = [], {}, {}
    for k, (model_id, kind) in enumerate(FLEET):
        path = folder / model_id
        kinds[model_id] = kind
        entry = {"id": model_id, "task": "text-classification", "source": {"path": str(path)}}
        if smoke:
            path.mkdir(parents=True, exist_ok=True)
            sizes[model_id] = SMOKE_FLEET_SIZES[kind]
            entry |= {"runtime": "bench.sized_runtime:DeclaredSize", "parameters": {"size": sizes[model_id]}}
        else:
            build_sized_model(path, model_id, *FLEET_SHAPES[kind], seed=k)
            sizes[model_id] = (path / "model.safetensors").stat().st_size
            entry["labels"] = [f"{model_id}-0", f"{model_id}-1"]
        entries.append(entry)
    return Fleet(entries, sizes, kinds)


def fleet_registry(folder: Path) -> tuple[Path, Fleet]:
    """``make bench``'s fleet (``build_fleet``) and a registry of it alone."""
    fleet = build_fleet(folder, smoke=False)
    path = folder / "registry.json"
    path.write_text(json.dumps({"models": fleet.entries}, indent=1))
    return path, fleet


# -- the worker replicas' processes --------------------------------------------------------------------------


def replica_pids(app_name: str, root: int | None = None) -> list[int]:
    """The worker replicas' processes of Serve application ``app_name`` below ``root`` in the process tree (this
    process by default; a ``serve run`` this run started, whose Ray is its own): Ray titles each
    ``ray::ServeReplica:<app>:ModelWorker``, followed by the method it runs at the moment, if any."""
    return sorted(
        proc.pid
        for proc in descendants(root or os.getpid())
        if cpu.serve_replica(cpu.title(proc.pid) or "") == (app_name, "ModelWorker")
    )


def process_memory(pid: int) -> dict[str, int]:
    """A process's peak resident memory (VmHWM) and its resident memory now (VmRSS), in bytes; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


class Server:
    """A server process this run started; stopped (its whole process group) at the end."""

    def __init__(self, cmd: list[str], env: dict, log: Path) -> None:
        self.log = log.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with no_haproxy_left(self.proc.pid):  # Serve's HAProxy outlives a stopped `serve run`
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        self.log.close()


def wait_first_prediction(url: str, model_id: str, timeout: float = 300) -> float:
    """The perf_counter time at which `url` first answers a prediction."""
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
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.seed_server:app", "--port", str(port), "--log-level", "warning"]
    server = Server(cmd, {**serve_env(), "SEED_REGISTRY": str(registry)}, logs / "seed.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_first_prediction(url, "sentiment")
    except BaseException:
        server.stop()
        raise
    return server, url


STANDARD_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
"""Ray Serve's standard mode (proxy actor, Ray object transfer between replicas), for comparison."""

VARIANTS: dict[str, dict] = {
    "HAProxy off (the ingress replicas' own HTTP servers)": {"env": {"RAY_SERVE_ENABLE_HA_PROXY": "0"}},
    "standard Ray Serve mode (proxy actor)": {"env": STANDARD_MODE},
    "batching off": {"worker": {"batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0}}},
    "1 worker replica x 2 torch threads": {"worker": {"num_replicas": 1, "torch_threads": 2}},
    "Ray's default router": {"worker": {"routing": {"policy": "ray_default"}}},
}
"""The app's variants the benchmark measures against the shipped configuration, each as start_app's
arguments."""


FLOOR_APP = {"name": "floor", "route_prefix": "/floor", "import_path": "bench.serve_floor:app"}
"""Ray Serve's floor (bench/serve_floor.py) as an application beside the app's."""


class App(NamedTuple):
    server: Server
    url: str
    grpc_target: str
    startup_s: float
    """seconds from the process start to the first answered prediction"""


def start_app(
    registry: Path,
    logs: Path,
    name: str,
    worker: dict | None = None,
    env: dict | None = None,
    args: dict | None = None,
    warm_model: str = "sentiment",
    floor: bool = False,
) -> App:
    """`serve run` on serve_config.yaml with the bench registry and 2 fixed worker replicas (the worker's
    arguments updated by `worker`, the app's other arguments by `args`), in the environment of `make run`
    (config/serve.env) updated by `env`, on free ports (HTTP, gRPC, HAProxy's metrics and stats) so that it
    runs beside `make run`. Started once `warm_model` answers a prediction. ``floor``: with Serve's floor
    (``bench/serve_floor.py``) beside it under /floor, an application of the same Serve instance."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    port, grpc_port = free_port(), free_port()
    config["http_options"]["port"] = port
    config["grpc_options"]["port"] = grpc_port
    app_args = config["applications"][0]["args"]
    app_args.update({k: v for k, v in (args or {}).items() if k != "worker"})
    app_args["registry_path"] = str(registry)
    app_args["model_roots"] = ["models", str(registry.parent)]  # the bench's own models sit beside its registry
    app_args["worker"].pop("autoscaling", None)
    app_args["worker"]["num_replicas"] = 2
    app_args["worker"].update((args or {}).get("worker", {}))
    app_args["worker"].update(worker or {})
    if floor:
        config["applications"].append(FLOOR_APP)
    path = logs / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(Path(sys.executable).parent / "serve")
    # A Ray instance of its own ("local"): without an address, `serve run` joins the newest Ray cluster that
    # `ray start` started on this machine, if one runs (another session's), and deploys the app there.
    server = Server(
        [serve, "run", "--address", "local", str(path)],
        {**serve_env(), **own_fixed_ports(), **(env or {})},
        logs / f"{name}.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        startup = wait_first_prediction(url, warm_model) - server.started
    except BaseException:
        server.stop()
        raise
    return App(server, url, f"127.0.0.1:{grpc_port}", startup)


APP_NAME = "multimodel"
"""The Serve application's name in serve_config.yaml, which start_app runs."""


def start_task_peer(registry: Path, logs: Path) -> tuple[Server, str]:
    """The single-process peers of the ``embed`` and ``ner`` models (``bench/task_peer.py``), on the same model
    files as the app's registry; not waited for (``wait_task_peer``), so that it starts while other work runs."""
    registry_ = read_bench_registry(registry)
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.task_peer:app", "--port", str(port), "--log-level", "warning"]
    env = {
        **serve_env(),
        "TASK_PEER_EMBED": registry_.get("embed").source.reference()[0],
        "TASK_PEER_NER": registry_.get("ner").source.reference()[0],
    }
    return Server(cmd, env, logs / "task-peer.log"), f"http://127.0.0.1:{port}"


def wait_task_peer(server: Server, url: str, timeout: float = 300) -> dict:
    """Wait until the task peer answers both models; its ``GET /info`` (torch threads, versions)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"the task peer exited with {server.proc.returncode}: see {server.log.name}")
            try:
                if all(
                    c.post(f"{url}/predict", json={"model_id": m, "input_data": "warm up"}).status_code == 200
                    for m in ("embed", "ner")
                ):
                    return c.get(f"{url}/info").json()
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Direct:
    """The floor: the model runtime in this process, on a worker replica's own share of threads (1), and on the
    threads the router gives a lone request on an idle node (RouteHint.threads, capped at the machine's cores in
    deployments/worker/batching.py: the app's 2 worker replicas' shares of 1 thread each) by the replica's own
    rule for them (``IdleThreadsRule``: where measured faster). Loaded once (``load_s``: its from_pretrained
    time), then measured in rounds (``round``) in turn with the servers' (``scenarios.hot_side_by_side``), so
    that it sees the machine at the speed they do, and unloaded (``close``)."""

    def __init__(self, registry: Path, model: str = "sentiment") -> None:
        import torch

        from deployments.runtimes import runtime_for
        from deployments.worker.threads import IdleThreadsRule

        self.model = model
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(1)  # a replica's own share (worker.torch_threads)
        self.idle_threads = min(2, cores)
        self.rule = IdleThreadsRule()
        self.runtime = runtime_for(read_bench_registry(registry).get(model), device="cpu")
        t0 = time.perf_counter()
        self.runtime.load()
        self.load_s = time.perf_counter() - t0
        self.runtime.predict(["warm up"])

    def round(self, n: int) -> Run:
        """`n` predictions one after the other, each timed alone, each on the threads the rule chooses: the
        inputs a round of the servers' sends, in its order (``scenarios.body_for``), so that the floor's p50
        and theirs are taken over the same sentences."""
        from deployments.worker.copies import with_threads

        run = Run()
        start = time.perf_counter()
        for i in range(n):
            text = body_for(self.model, {}, i)["input_data"]
            on_idle = self.rule.use()
            with with_threads(self.idle_threads if on_idle else None):
                t0 = time.perf_counter()
                self.runtime.predict([text])
                took = time.perf_counter() - t0
            self.rule.record(on_idle, took)
            run.latencies.append(took)
        run.elapsed = time.perf_counter() - start
        run.sent = n  # no load generator: the runtime called in this process
        return run

    def close(self) -> None:
        self.runtime.unload()


if __name__ == "__main__":  # the registry an app must serve for `python -m bench.run --app-url ...`
    import argparse

    ap = argparse.ArgumentParser(description="Build the benchmark's registry and models into a folder.")
    ap.add_argument("folder", type=Path)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny models only, and the smoke fleet, which the app must allow: its args updated by {SMOKE_APP}",
    )
    cli = ap.parse_args()
    print(bench_registry(cli.folder, cli.smoke))
