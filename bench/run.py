"""The benchmark: this app against the in-process floor and the seed-style server, side by side, in one run.

    make bench                                       # full run (minutes): docs/benchmarks.md, docs/bench/*.png
    python -m bench.run --smoke --out /tmp/bench     # seconds; a test in `make test` runs it

The peers are in ``bench/peers.py``, the load they get in ``bench/scenarios.py``, the cache simulations in
``bench/simulate.py``, the profile in ``bench/profile.py`` and the report in ``bench/report.py``; this
module runs them in order and writes the report. Variants of the app (bench/peers.py: VARIANTS) are
measured on the hot path and at 16 clients, and so is the app over each of its protocols (the native REST
API, the Open Inference Protocol over REST and over gRPC). The embedding and entity models are measured
against single-process servers of them as their users write them (``bench/task_peer.py``), and the memory
budget on a mixed-size fleet: in ``make bench`` models of about 25, 100 and 450 MB built offline, on an app of
its own (and again with Ray's default router); in a smoke run, models that declare their sizes, on the app.

The load comes from ``bench/loadgen.py``: wrk where it is installed (``apt-get install wrk``), else its own
raw-socket generator (``--generator`` or BENCH_GENERATOR choose); the report names the one that ran and
what each point cost it in CPU per request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import cpu, loadgen, scenarios
from bench.peers import (
    APP_NAME,
    SMOKE_APP,
    VARIANTS,
    Direct,
    Server,
    bench_registry,
    build_fleet,
    fleet_registry,
    replica_pids,
    start_app,
    start_seed,
    start_task_peer,
    wait_task_peer,
)
from bench.profile import profile_load
from bench.scenarios import median
from bench.simulate import pool_report, sized_pool_report, spread_report
from serve_app.core.paths import PROJECT_ROOT

SERVE_CONFIG = PROJECT_ROOT / "serve_config.yaml"


@dataclass
class Profile:
    """How much to measure: the full run or the smoke run."""

    hot_requests: int = 200
    clients: tuple[int, ...] = (1, 4, 16, 64)
    requests_per_client: int = 24
    min_requests: int = 20  # per throughput point and round
    max_requests: int = 400  # per throughput point and round: the seed's mixed workload reloads models on a third
    churn_requests: int = 600
    cold_repeats: int = 5
    variants: bool = True
    sim_models: int = 1000  # the pool simulation: models, replicas of 2 slots, requests
    sim_replicas: int = 64
    sim_requests: int = 20_000
    sized_requests: int = 300  # the mixed-size fleet's trace
    task_clients: tuple[int, ...] = (1, 16)  # embeddings against the sentence-transformers peer


SMOKE = Profile(
    hot_requests=10,
    clients=(1, 4),
    requests_per_client=3,
    min_requests=8,
    max_requests=20,
    churn_requests=30,
    cold_repeats=1,
    variants=False,
    sim_models=40,
    sim_replicas=4,
    sim_requests=400,
    sized_requests=40,
)


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
    simulation: dict = field(default_factory=dict)  # the pool at scale, simulated: workload -> policy -> hit ratio
    sized_simulation: dict = field(default_factory=dict)  # the same with model sizes and budgets (sized_pool_report)
    sized: dict = field(default_factory=dict)  # the mixed-size fleet in the app: "app", "ray-default" (sized_trace)
    tasks: dict = field(default_factory=dict)  # embeddings and entities against their single-process peers
    spread: dict = field(default_factory=dict)  # a hot model's requests over the replicas, simulated
    overhead: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)  # the hot path's time per request, by part (hot_breakdown)
    protocols: dict = field(default_factory=dict)  # protocol -> {"hot": summary, "16 clients": summary}
    generator: dict = field(default_factory=dict)  # the load generators that ran: names, descriptions
    notes: list[str] = field(default_factory=list)


FLOOR_GET = "floor: GET /floor/healthz (Ray Serve alone: HAProxy + an ingress replica)"
FLOOR_HOP = "floor hop: POST /floor/hop (Ray Serve alone: the same + one gRPC hop to another replica and back)"
"""The overhead routes of Ray Serve's floor (bench/serve_floor.py), by the names the report gives them."""


def machine_info() -> dict:
    import ray
    import torch
    import transformers

    with open("/proc/meminfo") as f:
        mem = next((int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal")), 0)
    return {
        "cpus": os.cpu_count(),
        "memory_mib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
    }


# -- the run --------------------------------------------------------------------------------------


def run(
    out: Path,
    smoke: bool,
    app_url: str | None = None,
    registry: Path | None = None,
    grpc_target: str | None = None,
    app_name: str | None = None,
    generator: str | None = None,
    keep_runs: int = 0,
    first_of_series: bool = True,
) -> Report:
    """Measure every peer and write the report (``keep_runs``: one of a series of that many runs, kept in
    OUT/bench/runs/, whose targets the report gives side by side; ``first_of_series``: this run starts the
    series, and the runs kept from an earlier one are removed). With `app_url`, the app running there must serve
    `registry` (see bench_registry), over gRPC at `grpc_target` if given (`app_name`: its Serve application,
    where several run); otherwise this run starts it with `serve run`. `generator` is the HTTP load
    generator, "wrk" or "rawhttp" (by default wrk where it is installed)."""
    p = SMOKE if smoke else Profile()
    report = Report(machine=machine_info())
    http = loadgen.use(generator)
    report.generator = {"http": http, "http_description": loadgen.describe(http)}
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    logs = work / "logs"
    logs.mkdir()
    registry = registry or bench_registry(work / "models", smoke)
    servers: list[Server] = []
    try:
        print("simulation: the pool at scale, and a hot model's spread", flush=True)
        report.simulation = pool_report(p.sim_models, p.sim_replicas, 2, p.sim_requests)
        report.spread = spread_report([(2, 16), (4, 64)], 200 if smoke else 2000, spread_at=4)
        print("simulation: the pool at scale with model sizes and budgets", flush=True)
        report.sized_simulation = sized_pool_report(p.sim_models, p.sim_replicas, 2, p.sim_requests)

        print("direct: in-process pipeline (loaded)", flush=True)
        direct = Direct(registry)
        report.cold["direct_load_s"] = direct.load_s

        print("task peer: sentence-transformers and the token-classification pipeline (starting)", flush=True)
        task_peer, task_url = start_task_peer(registry, logs)
        servers.append(task_peer)

        print("seed-style server", flush=True)
        seed, seed_url = start_seed(registry, logs)
        servers.append(seed)

        print("app", flush=True)
        if app_url:
            url = app_url
        else:
            app, url, grpc_target, report.startup["app_s"] = start_app(
                registry, logs, "app", args=SMOKE_APP if smoke else None, floor=True
            )
            app_name = APP_NAME  # Serve's floor is a second application: gRPC calls name theirs
            servers.append(app)
        print("hot path: the seed-style server (idle since), the app and the floor in alternating rounds", flush=True)
        hot_urls = {"seed": seed_url, "app": url}
        scenarios.warm(hot_urls)
        counted = {"app": scenarios.settled_worker_timings(url), "seed": scenarios.seed_timings(seed_url)}
        hot = scenarios.hot_side_by_side(hot_urls, p.hot_requests, warmed=True, local={"direct": direct.round})
        direct.close()
        report.hot.update({name: run.summary() for name, run in hot.items()})
        report.hot["direct"]["idle_threads"] = direct.rule.report().model_dump()
        app_after = scenarios.settled_worker_timings(url, counted["app"]["requests"] + len(hot["app"].latencies))
        seed_after = scenarios.seed_timings(seed_url)
        report.breakdown = scenarios.hot_breakdown(
            hot["app"],
            hot["seed"],
            {k: app_after[k] - counted["app"][k] for k in app_after},
            {k: seed_after[k] - counted["seed"][k] for k in seed_after},
        )
        print("throughput: the seed-style server and the app, each point on both in turn", flush=True)
        processes = {"seed": (seed.proc.pid, cpu.ONE_PROCESS)}
        if not app_url:
            processes["app"] = (app.proc.pid, cpu.REST)  # serve run, and the Ray instance it started
        report.throughput.update(
            scenarios.throughput(
                {"seed": seed_url, "app": url},
                p.clients,
                p.requests_per_client,
                p.max_requests,
                p.min_requests,
                processes=processes,
            )
        )
        print("the fixed cost of each serving path: a route that runs no model, on both in turn", flush=True)
        routes = {
            "seed: GET /models (no model run)": (seed_url, "/models"),
            "app: GET /healthz (proxy + ingress, no model run)": (url, "/healthz"),
        }
        if not app_url:  # Serve's floor runs beside an app this run started (bench/serve_floor.py)
            routes[FLOOR_GET] = (url, "/floor/healthz")
            routes[FLOOR_HOP] = (url, *scenarios.FLOOR_HOP_REQUEST)
        overhead = scenarios.trivial_side_by_side(routes, p.hot_requests)
        report.overhead.update({name: run.summary() for name, run in overhead.items()})
        seed.stop()
        servers.remove(seed)
        print("tasks: embeddings and entities, the app and their single-process peers side by side", flush=True)
        report.tasks = {"peer": wait_task_peer(task_peer, task_url)}
        report.tasks.update(
            scenarios.tasks(
                {"peer": task_url, "app": url},
                p.task_clients,
                p.requests_per_client,
                p.max_requests,
                p.min_requests,
                p.hot_requests,
            )
        )
        configured = None if app_url else yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["worker"]
        report.tasks["app"] = app_threads(url, configured and configured.get("torch_threads"))
        task_peer.stop()
        servers.remove(task_peer)
        if grpc_target:
            print("app over each protocol: REST /predict, REST /v2 infer, gRPC ModelInfer", flush=True)
            n16 = min(16 * p.requests_per_client, p.max_requests)
            report.protocols = scenarios.protocols(url, grpc_target, app_name, p.hot_requests, n16)
            report.generator["grpc_description"] = loadgen.describe_grpc()
        else:
            report.notes.append("gRPC not measured: the app's gRPC address was not given (--app-grpc)")
        report.churn = scenarios.churn(url, p.churn_requests)
        if smoke:  # the smoke fleet (models that declare their sizes) is in the app's registry
            print("mixed-size fleet on the app", flush=True)
            fleet = build_fleet(work / "fleet", smoke=True)
            root = os.getpid() if app_url else app.proc.pid
            report.sized = fleet_report(fleet, SMOKE_APP["worker"]["memory_bytes"], declared=True)
            report.sized["app"] = scenarios.sized_trace(
                url, fleet.ids, p.sized_requests, replica_pids(app_name or APP_NAME, root)
            )
        cold = scenarios.cold(url, p.cold_repeats)
        report.cold["app_s"] = median(cold.latencies)
        report.cold["app"] = cold.summary()
        if not smoke and not app_url:
            print("profile at 16 clients", flush=True)
            report.profile, report.generator["profile_load"] = profile_load(url, root=app.proc.pid)

        if not smoke and not app_url:
            # The fleet app's budgets from the replicas' measured baseline (the same code, the same machine), else
            # from the one the registry check assumes (worker.baseline_bytes' default)
            measured = [r["memory"]["baseline_bytes"] for r in scenarios.replica_reports(url)]
            baseline = max((b for b in measured if b), default=640 * 1024 * 1024)
            app.stop()
            servers.remove(app)
            report.sized = measure_fleet(work / "fleet", logs, baseline, p.sized_requests)
        elif not smoke:
            report.notes.append("mixed-size fleet not measured: it needs an app of its own (run without --app-url)")

        if p.variants and not app_url:
            for name, kwargs in VARIANTS.items():
                print(f"app variant: {name}", flush=True)
                variant, vurl, _, startup = start_app(registry, logs, f"variant{len(report.variants)}", **kwargs)
                servers.append(variant)
                n16 = min(16 * p.requests_per_client, p.max_requests)
                c16 = scenarios.rounds_of(
                    [scenarios.closed_loop(vurl, ["sentiment"], 16, n16, seed=16) for _ in range(scenarios.ROUNDS)]
                )
                report.variants[name] = {
                    "hot": scenarios.hot(vurl, p.hot_requests).summary(),
                    "16 clients": c16.summary(),
                    "startup_s": startup,
                }
                if name == "Ray's default router":  # the router's own ground: churn over the pool
                    report.churn["ray-default"] = scenarios.churn(vurl, p.churn_requests)["app"]
                variant.stop()
                servers.remove(variant)
    except BaseException:
        print(f"the servers' logs are kept in {logs}", flush=True)
        raise
    finally:
        for s in servers:
            s.stop()
    shutil.rmtree(work, ignore_errors=True)  # its models and logs: a finished run leaves nothing behind
    write_report(report, out, smoke, runs=keep_run(report, out, keep_runs, first_of_series) if keep_runs else None)
    return report


def app_threads(url: str, configured: int | None) -> dict:
    """How the app's worker replicas run their models: how many (GET /models), their torch threads as configured
    (``worker.torch_threads``; None where this run did not start the app), and the most threads one of their
    forward passes has used (a lone request on an idle node takes the node's idle threads where its copy measured
    them faster), and each model's measures of that (``idle_threads``: GET /models' ``replicas[].idle_threads``,
    from the replica with the most lone batches measured)."""
    reports = scenarios.replica_reports(url)
    most = max((r.get("counters", {}).get("most_threads", 0) for r in reports), default=0)
    measures: dict[str, dict] = {}
    for r in reports:
        for model_id, m in r.get("idle_threads", {}).items():
            if m["lone_batches"] > measures.get(model_id, {}).get("lone_batches", 0):
                measures[model_id] = m
    return {"replicas": len(reports), "torch_threads": configured, "most_threads": most, "idle_threads": measures}


def fleet_report(fleet, memory_bytes: int | None, declared: bool) -> dict:
    """The fleet as built: its sizes (``declared``: models that declare them, the smoke run's) and kinds, the budgets
    that fit one large model and one small one (``window``: [low, high)), and the replicas' memory_bytes."""
    low, high = fleet.budget_window()
    return {
        "sizes": fleet.sizes,
        "kinds": fleet.kinds,
        "window": [low, high],
        "memory_bytes": memory_bytes,
        "declared": declared,
    }


def measure_fleet(folder: Path, logs: Path, baseline: int, n: int) -> dict:
    """``make bench``'s mixed-size fleet, built offline into ``folder``, on an app of its own whose worker replicas'
    budgets fit one large model and one small one (``worker.memory_bytes``: the main app's measured baseline plus
    the middle of the window), then on another such app with Ray's default router (``routing.policy:
    ray_default``)."""
    path, fleet = fleet_registry(folder)
    memory = baseline + fleet.budget_target()
    out = fleet_report(fleet, memory, declared=False)
    warm = next(m for m in fleet.ids if fleet.kinds[m] == "small")
    for name, routing in (("app", {}), ("ray-default", {"policy": "ray_default"})):
        print(f"mixed-size fleet: {name}, worker.memory_bytes {memory}", flush=True)
        worker = {"memory_bytes": memory, **({"routing": routing} if routing else {})}
        app = start_app(path, logs, f"fleet-{name}", worker=worker, warm_model=warm)
        try:
            out[name] = scenarios.sized_trace(app.url, fleet.ids, n, replica_pids(APP_NAME, app.server.proc.pid))
        finally:
            app.server.stop()
    return out


def write_report(report: Report, out: Path, smoke: bool, runs: list[Report] | None = None) -> None:
    """benchmarks.json and benchmarks.md in ``out``; ``runs``: the earlier runs of the same series, oldest
    first, whose targets the report gives beside this run's."""
    from bench.report import render

    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report.__dict__, indent=1, default=str))
    (out / "benchmarks.md").write_text(render(report, out, smoke, runs=runs))
    print(f"wrote {out / 'benchmarks.md'}")


def read_report(path: Path) -> Report:
    """A run's report from its benchmarks.json."""
    data = json.loads(path.read_text())
    for peer in data["throughput"].values():  # JSON turned the client counts into strings
        for workload, series in peer.items():
            peer[workload] = {int(k): v for k, v in series.items()}
    embeddings = data.get("tasks", {}).get("embeddings", {})
    for peer, series in embeddings.items():
        embeddings[peer] = {int(k): v for k, v in series.items()}
    return Report(**data)


def runs_folder(out: Path) -> Path:
    return out / "bench" / "runs"


def earlier_runs(out: Path, latest: Path) -> list[Report]:
    """The runs kept in OUT/bench/runs/, oldest first, but ``latest`` (a benchmarks.json), which is kept there
    too under another name: a run is known by its measurements, not by its path."""
    own = json.loads(latest.read_text())
    paths = sorted(runs_folder(out).glob("run-*.json"))
    return [read_report(p) for p in paths if json.loads(p.read_text()) != own]


def keep_run(report: Report, out: Path, series: int, first: bool) -> list[Report]:
    """Keep this run in OUT/bench/runs/ as the newest of a series of ``series`` runs; returns the earlier runs
    of the series, oldest first. The ``first`` run of a series removes the runs kept there before (an earlier
    series', finished or not: its runs were measured on another day, maybe another machine, or by other code),
    and a run beyond ``series`` the oldest."""
    folder = runs_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("run-*.json"))
    for old in paths if first else paths[: max(0, len(paths) - (series - 1))]:
        old.unlink()
    earlier = [read_report(p) for p in sorted(folder.glob("run-*.json"))]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (folder / f"run-{stamp}.json").write_text(json.dumps(report.__dict__, indent=1, default=str))
    return earlier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs")
    ap.add_argument("--smoke", action="store_true", help="a few requests per scenario, tiny models")
    ap.add_argument("--app-url", help="measure an app already running there instead of starting one")
    ap.add_argument("--registry", type=Path, help="with --app-url: the registry it serves (python -m bench.peers)")
    ap.add_argument("--app-grpc", help="with --app-url: its gRPC address (host:port), to measure gRPC too")
    ap.add_argument("--app-name", help="with --app-grpc: its Serve application name, where several run")
    ap.add_argument(
        "--generator",
        choices=loadgen.HTTP_GENERATORS,
        help="the HTTP load generator (default: BENCH_GENERATOR, else wrk where installed, else rawhttp)",
    )
    ap.add_argument("--render", type=Path, help="only render the report again from this benchmarks.json")
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="full runs, one after the other (make bench: 3); each is kept in OUT/bench/runs/, and the report "
        "gives every target in each of them, met only where it holds in all",
    )
    args = ap.parse_args()
    if args.render:
        write_report(read_report(args.render), args.out, smoke=False, runs=earlier_runs(args.out, args.render))
        return
    for i in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"run {i} of {args.runs}", flush=True)
        run(
            args.out,
            args.smoke,
            args.app_url,
            args.registry,
            grpc_target=args.app_grpc,
            app_name=args.app_name,
            generator=args.generator,
            keep_runs=args.runs if args.runs > 1 else 0,
            first_of_series=i == 1,
        )


if __name__ == "__main__":
    main()
