"""A smoke run of the benchmark (seconds): every scenario runs against the app, the seed-style server and
the in-process floor, the app over REST and gRPC, and the report is written, so that `make bench` does
not rot."""

import pytest

pytestmark = pytest.mark.integration


def test_benchmark_smoke_run(deploy, grpc_target, tmp_path):
    from bench.peers import bench_registry
    from bench.run import run
    from serve_app.core import ray_internals

    registry = bench_registry(tmp_path / "models", smoke=True)
    url = deploy(
        "bench",
        {
            "registry_path": str(registry),
            "model_roots": [str(registry.parent)],
            "auth": {"mode": "off"},
            "worker": {"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1},
        },
    )
    try:
        report = run(
            tmp_path / "out", smoke=True, app_url=url, registry=registry, grpc_target=grpc_target, app_name="bench"
        )
    finally:
        ray_internals.delete_app_in_background("bench")

    for peer in ("direct", "seed", "app"):
        assert report.hot[peer]["n"] == 10 and report.hot[peer]["errors"] == 0, peer
    for peer in ("seed", "app"):
        for workload in ("one model", "mix of 3"):
            assert all(s["errors"] == 0 and s["rps"] > 0 for s in report.throughput[peer][workload].values())
    assert set(report.protocols) == {"REST /predict", "REST /v2 infer", "gRPC ModelInfer"}
    for protocol, figures in report.protocols.items():
        assert figures["hot"]["n"] == 10 and figures["hot"]["errors"] == 0, protocol
        assert figures["16 clients"]["errors"] == 0 and figures["16 clients"]["rps"] > 0, protocol
    churn = report.churn
    assert churn["requests"] == 30 and churn["slots"] == 4
    assert churn["belady"]["hit_ratio"] >= churn["lru"]["hit_ratio"]
    assert 0 <= churn["app"]["hit_ratio"] <= 1
    assert report.cold["app_s"] > 0
    for workload, hit in report.simulation["workloads"].items():  # the pool at scale, simulated
        assert hit["Belady"] >= hit["global LRU"] and 0 < hit["model-aware"] <= 1, workload
    assert report.spread, "a hot model's spread over the replicas, simulated"

    md = (tmp_path / "out" / "benchmarks.md").read_text()
    for heading in (
        "## Targets",
        "## 1. Hot path",
        "## 2. Throughput",
        "## gRPC and REST",
        "## Routing",
        "## Cold load",
    ):
        assert heading in md
    assert f"{report.machine['cpus']} CPUs" in md
    for png in ("hot_path", "throughput", "churn", "simulation"):
        assert (tmp_path / "out" / "bench" / f"{png}.png").stat().st_size > 5000
