"""The peers the benchmark measures, each serving the same model files:

* direct: the transformers pipeline called in this process (the floor);
* seed:   a single-process FastAPI + uvicorn server with an in-process LRU of two models
          (``bench/seed_server.py``);
* app:    this application, started with ``serve run`` in the environment ``make run`` uses, over HTTP
          and over gRPC (the Open Inference Protocol's service).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import yaml

from bench.scenarios import Run
from demo.tiny_models import build_image_model, build_text_model, write_registry
from serve_app.core.paths import PROJECT_ROOT
from serve_app.devtools import free_port, no_haproxy_left, own_fixed_ports, serve_env


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
        for name, task in (
            ("sentiment", "text-classification"),
            ("spam", "text-classification"),
            ("image", "image-classification"),
        ):
            models[name] = (task, PROJECT_ROOT / "models" / name)
    for k in range(8):
        models[f"c{k}"] = ("text-classification", build_text_model(folder / f"c{k}", f"c{k}", seed=k))
    return write_registry(folder / "registry.json", models)


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
    wait_first_prediction(url, "sentiment")
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


class App(NamedTuple):
    server: Server
    url: str
    grpc_target: str
    startup_s: float
    """seconds from the process start to the first answered prediction"""


def start_app(registry: Path, logs: Path, name: str, worker: dict | None = None, env: dict | None = None) -> App:
    """`serve run` on serve_config.yaml with the bench registry and 2 fixed worker replicas (the worker's
    arguments updated by `worker`), in the environment of `make run` (config/serve.env) updated by `env`, on
    free ports (HTTP, gRPC, HAProxy's metrics and stats) so that it runs beside `make run`."""
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    port, grpc_port = free_port(), free_port()
    config["http_options"]["port"] = port
    config["grpc_options"]["port"] = grpc_port
    args = config["applications"][0]["args"]
    args["registry_path"] = str(registry)
    args["model_roots"] = ["models", str(registry.parent)]  # the bench's own models sit beside its registry
    args["worker"].pop("autoscaling", None)
    args["worker"]["num_replicas"] = 2
    args["worker"].update(worker or {})
    path = logs / f"serve-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(Path(sys.executable).parent / "serve")
    server = Server(
        [serve, "run", str(path)], {**serve_env(), **own_fixed_ports(), **(env or {})}, logs / f"{name}.log"
    )
    url = f"http://127.0.0.1:{port}"
    startup = wait_first_prediction(url, "sentiment") - server.started
    return App(server, url, f"127.0.0.1:{grpc_port}", startup)


def direct_hot(registry: Path, n: int) -> tuple[Run, list[float]]:
    """The floor: the model runtime in this process. Also returns its from_pretrained (load) times."""
    import torch

    from deployments.runtimes import runtime_for
    from serve_app.core.registry import Registry
    from serve_app.core.tasks import TaskCatalog

    torch.set_num_threads(1)  # as a worker replica runs it
    roots = TaskCatalog.load(model_roots=["models", str(registry.parent)])  # the bench's models beside its registry
    spec = Registry.from_file(registry, roots).get("sentiment")
    runtime = runtime_for(spec, device="cpu")
    t0 = time.perf_counter()
    runtime.load()
    load_times = [time.perf_counter() - t0]
    run = Run()
    runtime.predict(["warm up"])
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        runtime.predict(["This movie was great!"])
        run.latencies.append(time.perf_counter() - t0)
    run.elapsed = time.perf_counter() - start
    run.sent = n  # no load generator: the runtime called in this process
    runtime.unload()
    return run, load_times


if __name__ == "__main__":  # the registry an app must serve for `python -m bench.run --app-url ...`
    import argparse

    ap = argparse.ArgumentParser(description="Build the benchmark's registry and models into a folder.")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny models only")
    cli = ap.parse_args()
    print(bench_registry(cli.folder, cli.smoke))
