"""A smoke run of the benchmark (seconds): every scenario runs against the app, the seed-style server and
the in-process floor, and the report is written, so that `make bench` does not rot."""

import pytest

pytestmark = pytest.mark.integration


def test_benchmark_smoke_run(deploy, tmp_path):
    from ray import serve

    from bench.peers import bench_registry
    from bench.run import run

    registry = bench_registry(tmp_path / "models", smoke=True)
    url = deploy(
        "bench",
        {
            "registry_path": str(registry),
            "auth": {"mode": "off"},
            "worker": {"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1},
        },
    )
    try:
        report = run(tmp_path / "out", smoke=True, app_url=url, registry=registry)
    finally:
        serve.delete("bench")

    for peer in ("direct", "seed", "app"):
        assert report.hot[peer]["n"] == 10 and report.hot[peer]["errors"] == 0, peer
    for peer in ("seed", "app"):
        for workload in ("one model", "mix of 3"):
            assert all(s["errors"] == 0 and s["rps"] > 0 for s in report.throughput[peer][workload].values())
    churn = report.churn
    assert churn["requests"] == 30 and churn["slots"] == 4
    assert churn["belady"]["hit_ratio"] >= churn["lru"]["hit_ratio"]
    assert 0 <= churn["app"]["hit_ratio"] <= 1
    assert report.cold["app_s"] > 0

    md = (tmp_path / "out" / "benchmarks.md").read_text()
    for heading in ("## Targets", "## 1. Hot path", "## 2. Throughput", "## 3. Model churn", "## 4. Cold load"):
        assert heading in md
    assert f"{report.machine['cpus']} CPUs" in md
    for png in ("hot_path", "throughput", "churn"):
        assert (tmp_path / "out" / "bench" / f"{png}.png").stat().st_size > 5000
