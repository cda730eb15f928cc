"""A smoke run of the benchmark (seconds): every scenario runs against the app, the seed-style server and
the in-process floor, the app over REST and gRPC, the embedding and entity models against their
single-process peers, the memory budget on a fleet of mixed sizes, and the report is written, so that `make
bench` does not rot. It runs the benchmark's own load generator (rawhttp: no apt package needed, so a broken generator
fails the suite everywhere); wrk, where installed, runs against the same app in a test of its own."""

import math
import os

import pytest

from deployments.worker.threads import TRIALS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench_app(deploy, tmp_path_factory):
    """The app on the benchmark's smoke registry, with what its mixed-size fleet needs (SMOKE_APP: the fleet's
    runtime allowed, a memory budget): (its URL, the registry)."""
    from bench.peers import SMOKE_APP, bench_registry
    from serve_app.core import ray_internals

    registry = bench_registry(tmp_path_factory.mktemp("bench") / "models", smoke=True)
    url = deploy(
        "bench",
        {
            "registry_path": str(registry),
            "model_roots": [str(registry.parent)],
            "auth": {"mode": "off"},
            "runtime_modules": SMOKE_APP["runtime_modules"],
            "worker": {"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1, **SMOKE_APP["worker"]},
        },
    )
    yield url, registry
    ray_internals.delete_app_in_background("bench")


def assert_point(summary: dict, planned: int, generator: str, rounds: int, where: str) -> None:
    """One figure of the report: every planned request sent and answered as planned (200, the model asked
    for), by the named generator, whose CPU per request is a finite figure; consistent percentiles."""
    where = f"{where} (errors: {summary['error_kinds']}, the first: {summary['first_error']!r})"
    assert (summary["sent"], summary["n"], summary["errors"]) == (planned, planned, 0), where
    assert summary["generator"] == generator and summary["rounds"] == rounds, where
    assert math.isfinite(summary["cpu_ms_per_request"]) and summary["cpu_ms_per_request"] > 0, where
    assert 0 < summary["p50_ms"] <= summary["p99_ms"], where
    assert math.isfinite(summary["rps"]) and summary["rps"] > 0, where


def assert_sized_consistent(result: dict, n: int, total_bytes: int, copies: int, where: str) -> None:
    """The simulated policies on one trace with sizes (simulate.sized_peers): ratios within [0, 1], no policy above
    Belady's count-only optimum nor the compulsory misses' bound, the bytes loaded those of the misses, and the
    global peers with the pool's bytes and count cap."""
    bound, compulsory = result["Belady (count)"]["hit_ratio"], result["compulsory"]
    assert 0 <= bound <= compulsory["hit_ratio"] <= 1, where
    assert result["total"] == {"bytes": total_bytes, "copies": copies}, where
    for policy in ("model-aware", "ray-default", "global byte-LRU", "global GDSF"):
        v, at = result[policy], f"{where}: {policy}"
        assert v["requests"] == n and 0 <= v["hit_ratio"] <= bound, at
        assert 0 <= v["byte_hit_ratio"] <= compulsory["byte_hit_ratio"] <= 1, at
        assert v["loaded_bytes"] == pytest.approx((1 - v["byte_hit_ratio"]) * v["requested_bytes"]), at
        assert v["bytes_per_1000"] == pytest.approx(1000 * v["loaded_bytes"] / n), at


def test_benchmark_smoke_run(bench_app, grpc_target, tmp_path):
    from bench import cpu
    from bench.peers import SMOKE_FLEET_SIZES, SMOKE_MEMORY_BYTES
    from bench.run import SMOKE, run
    from bench.scenarios import ROUNDS, WORKLOADS, split
    from bench.simulate import zipf_trace

    url, registry = bench_app
    p = SMOKE
    report = run(
        tmp_path / "out",
        smoke=True,
        app_url=url,
        registry=registry,
        grpc_target=grpc_target,
        app_name="bench",
        generator="rawhttp",
    )

    assert report.generator["http"] == "rawhttp" and "raw sockets" in report.generator["http_description"]
    assert report.generator["grpc_description"].startswith("grpcio ")
    # the hot path: the peers side by side in ten alternating rounds, the in-process floor among them
    for peer in ("seed", "app"):
        assert_point(report.hot[peer], p.hot_requests, "rawhttp", 10, f"hot {peer}")
    direct = report.hot["direct"]
    assert (direct["n"], direct["errors"], direct["rounds"]) == (p.hot_requests, 0, 10), direct
    assert 0 < direct["p50_ms"] <= direct["p99_ms"], direct
    # the floor takes its threads by the worker replicas' rule: every call measured, both ways tried
    measured = direct["idle_threads"]
    assert measured["lone_batches"] == p.hot_requests and measured["idle_threads_ms"] and measured["own_threads_ms"]
    # the hot path's breakdown: the servers counted every request of the rounds, each part within the whole
    app, seed = report.breakdown["app"], report.breakdown["seed"]
    assert (app["requests"], app["counted"], app["batches"]) == (p.hot_requests,) * 3, app  # one client: lone
    assert (seed["requests"], seed["counted"]) == (p.hot_requests,) * 2, seed
    assert 0 < app["model_ms"] < app["model_ms"] + app["worker_own_ms"] < app["end_to_end_ms"], app
    assert 0 < seed["model_ms"] < seed["end_to_end_ms"], seed
    for route, figures in report.overhead.items():
        assert_point(figures, p.hot_requests, "rawhttp", ROUNDS, route)
    assert [route.split(":")[0] for route in report.overhead] == ["seed", "app"]
    # throughput: each point on both servers, every workload and client count, in rounds
    for peer in ("seed", "app"):
        assert set(report.throughput[peer]) == set(WORKLOADS), peer
        for workload, series in report.throughput[peer].items():
            assert sorted(series) == sorted(p.clients), (peer, workload)
            for c, s in series.items():
                planned = ROUNDS * min(max(c * p.requests_per_client, p.min_requests), p.max_requests)
                assert_point(s, planned, "rawhttp", ROUNDS, f"{peer} {workload} {c}")
                # the server's CPU per request over its rounds, by process role: the seed-style server's one
                # process; the app's only where the run started it (here it runs in the test session's Ray)
                cpu_ms = s["server_cpu_ms_per_request"]
                if peer == "seed":
                    assert set(cpu_ms) == {cpu.ONE_PROCESS} and cpu_ms[cpu.ONE_PROCESS] > 0, (workload, c, cpu_ms)
                    assert s["server_cpus"] > 0, (workload, c)
                else:
                    assert cpu_ms == {} and s["server_cpus"] is None, (workload, c)
    # the roles bench/cpu.py sees in a Ray Serve instance as it runs in the shipped mode (this session's): each
    # part of the app, by the titles Ray gives its processes
    roles = {role for role, _ in cpu.snapshot(os.getpid(), "the test session").values()}
    assert {cpu.WORKERS, cpu.INGRESS, cpu.HAPROXY, cpu.CONTROLLER, cpu.REST} <= roles, roles
    # each protocol: the hot path over the rounds, and 16 clients in each round
    assert list(report.protocols) == ["REST /predict", "REST /v2 infer", "gRPC ModelInfer"]
    n16 = min(16 * p.requests_per_client, p.max_requests)
    for protocol, figures in report.protocols.items():
        generator = "grpc" if protocol.startswith("gRPC") else "rawhttp"
        hot_rounds = len(split(p.hot_requests, ROUNDS))
        assert_point(figures["hot"], p.hot_requests, generator, hot_rounds, f"{protocol} hot")
        assert_point(figures["16 clients"], ROUNDS * n16, generator, ROUNDS, f"{protocol} 16 clients")
    # churn: the trace sent in order, every request answered; the app's loads from its own counters: at
    # least one per model of the trace (every slot was freed first), and no fewer than the optimum's
    churn = report.churn
    assert churn["requests"] == p.churn_requests and churn["slots"] == 4
    app = churn["app"]
    assert (app["sent"], app["n"], app["errors"]) == (p.churn_requests, p.churn_requests, 0)
    assert app["generator"] == "rawhttp"
    assert math.isfinite(app["cpu_ms_per_request"])
    distinct = len(set(zipf_trace(8, p.churn_requests, s=1.0, seed=1)))
    assert churn["belady"]["hit_ratio"] >= churn["lru"]["hit_ratio"]
    assert churn["belady"]["hit_ratio"] >= app["hit_ratio"]  # 2 replicas x 2 slots: one cache of 4 at best
    assert 0 <= app["hit_ratio"] <= 1 - distinct / p.churn_requests
    assert app["loads_per_1000"] == pytest.approx(1000 * (1 - app["hit_ratio"]))
    cold = report.cold["app"]
    assert (cold["sent"], cold["n"], cold["errors"]) == (p.cold_repeats, p.cold_repeats, 0)
    assert report.cold["app_s"] == pytest.approx(cold["p50_ms"] / 1000)
    for workload, hit in report.simulation["workloads"].items():  # the pool at scale, simulated
        assert hit["Belady"] >= hit["global LRU"] and 0 < hit["model-aware"] <= 1, workload
    assert report.spread, "a hot model's spread over the replicas, simulated"
    sim = report.sized_simulation  # the same with sizes: every workload, every policy, consistent
    assert set(sim["workloads"]) == set(report.simulation["workloads"])
    for workload, result in sim["workloads"].items():
        replicas = sim["replicas"]
        assert_sized_consistent(result, p.sim_requests, replicas * sim["budget_bytes"], 2 * replicas, workload)

    # embeddings and entities: the app and the single-process peer, side by side, every request answered
    tasks = report.tasks
    assert tasks["peer"]["torch_threads"] >= 1 and tasks["app"]["replicas"] == 2
    # the entity model's lone requests (one client) were each offered the idle threads, and timed both ways
    ner_threads = tasks["app"]["idle_threads"].get("ner")
    assert ner_threads, f"no idle-thread measures for ner: {tasks['app']}"
    assert ner_threads["lone_batches"] >= p.hot_requests and ner_threads["on_idle_threads"] >= TRIALS, ner_threads
    assert ner_threads["own_threads_ms"] > 0 and ner_threads["idle_threads_ms"] > 0, ner_threads
    for peer in ("peer", "app"):
        assert sorted(tasks["embeddings"][peer]) == sorted(p.task_clients), peer
        for c, s in tasks["embeddings"][peer].items():
            planned = ROUNDS * min(max(c * p.requests_per_client, p.min_requests), p.max_requests)
            assert_point(s, planned, "rawhttp", ROUNDS, f"embeddings {peer} {c}")
        assert_point(tasks["ner"][peer], p.hot_requests, "rawhttp", 10, f"entities {peer}")

    # the mixed-size fleet on the app: the trace answered; hits and bytes from the replicas' own counts and sizes
    sized = report.sized
    fleet = sized["app"]
    a, n = fleet["app"], p.sized_requests
    trace = zipf_trace(len(fleet["models"]), n, s=1.0, seed=2)
    assert (a["sent"], a["n"], a["errors"]) == (n, n, 0) and a["generator"] == "rawhttp"
    assert math.isfinite(a["cpu_ms_per_request"]) and a["cpu_ms_per_request"] > 0
    requested = {fleet["models"][m] for m in trace}
    assert {m: fleet["sizes"][m] for m in requested} == {m: SMOKE_FLEET_SIZES[sized["kinds"][m]] for m in requested}
    assert a["misses"] == sum(a["loads"].values()) >= len(requested) and a["hits"] + a["misses"] == n
    assert 0 <= a["hit_ratio"] <= 1 - len(requested) / n
    assert a["loaded_bytes"] == sum(count * fleet["sizes"][m] for m, count in a["loads"].items())
    assert a["requested_bytes"] == sum(fleet["sizes"][fleet["models"][m]] for m in trace)
    assert 0 <= a["byte_hit_ratio"] <= 1 and a["bytes_per_1000"] == pytest.approx(1000 * a["loaded_bytes"] / n)
    assert a["miss_p50_ms"] <= a["miss_p99_ms"] and a["p50_ms"] <= a["p99_ms"]
    assert a["counters"]["refused_over_budget"] == 0
    # the budget: memory_bytes less each replica's own baseline; the processes found and their peak read
    assert len(fleet["budgets"]) == 2
    for budget, baseline in zip(fleet["budgets"], fleet["baselines"], strict=True):
        assert budget == SMOKE_MEMORY_BYTES - baseline > 0
    memory = fleet["memory"]
    assert memory["budget_plus_baseline_bytes"] == SMOKE_MEMORY_BYTES
    assert memory["limit_bytes"] == int(SMOKE_MEMORY_BYTES * 1.15)
    assert len(memory["processes"]) == 2 and all(p_["peak_resident_bytes"] > 0 for p_ in memory["processes"])
    for replica in memory["replicas"].values():  # the budget held: models never above it, as the replica counts
        assert 0 < replica["peak_used_bytes"] <= replica["budget_bytes"]
    assert memory["peak_bytes"] >= max(p_["peak_resident_bytes"] for p_ in memory["processes"])
    assert_sized_consistent(fleet["simulated"], n, sum(fleet["budgets"]), 4, "the fleet's trace")

    md = (tmp_path / "out" / "benchmarks.md").read_text()
    for heading in (
        "## Targets",
        "## 1. Hot path",
        "## 2. Throughput",
        "## gRPC and REST",
        "## Routing",
        "## Memory: models of many sizes",
        "## Tasks: embeddings and entities",
        "## Cold load",
        "## Load generator",
    ):
        assert heading in md
    assert f"{report.machine['cpus']} CPUs" in md
    assert "runs on both CPUs where that was measured faster than on one" in md  # the floor's rule, stated
    assert f"Load generator: **{report.generator['http_description']}**" in md
    table = md.split("## Load generator")[1]
    rows = [line for line in table.splitlines() if "| rawhttp |" in line or "| grpc |" in line]
    # one row per point: 2 hot, 2 routes, 2 peers x 3 workloads x the client counts, 3 protocols x 2, 2 peers x
    # the embeddings' client counts, 2 entities, churn, the fleet, cold
    assert len(rows) == 2 + 2 + 2 * 3 * len(p.clients) + 6 + 2 * len(p.task_clients) + 2 + 3
    for png in ("hot_path", "throughput", "churn", "simulation", "sized_simulation"):
        assert (tmp_path / "out" / "bench" / f"{png}.png").stat().st_size > 5000


def test_wrk_drives_the_app_as_planned(bench_app):
    from bench import loadgen, scenarios

    if loadgen.wrk_path() is None:
        pytest.skip("wrk is not installed (apt-get install wrk); the smoke run above uses rawhttp")
    url, _ = bench_app
    previous = loadgen._chosen
    loadgen.use("wrk")
    try:
        hot = scenarios.hot(url, 6).summary()
        mixed = scenarios.closed_loop(url, ["sentiment", "spam", "image"], 4, 12, seed=4).summary()
        v2 = scenarios.closed_loop(url, ["sentiment"], 2, 4, api="v2").summary()
        healthz = scenarios.trivial_side_by_side({"app": (url, "/healthz")}, 6)["app"].summary()
    finally:
        loadgen._chosen = previous
    assert_point(hot, 6, "wrk", 3, "hot")
    assert_point(mixed, 12, "wrk", 1, "three models, 4 clients")
    assert_point(v2, 4, "wrk", 1, "v2")
    assert_point(healthz, 6, "wrk", 3, "GET /healthz")
