"""Operating the app: model status from the replicas, explicit load and unload, health, preload, request ids,
and Prometheus metrics."""

import time

import httpx
import pytest

from demo.tiny_models import write_registry
from tests.helpers import metric_sum, tiny_args, wait_for

pytestmark = pytest.mark.integration


def test_health_and_readiness(limits_url):
    with httpx.Client(timeout=30) as c:
        assert c.get(f"{limits_url}/healthz").json() == {"status": "ok"}
        ready = c.get(f"{limits_url}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "models": 9, "worker_replicas": 1}
        assert c.get(f"{limits_url}/v2/health/ready").json() == {"ready": True}


def test_with_no_worker_replica_running_the_app_is_live_but_not_ready(client, deploy, tiny_registry):
    """Scaled to zero (autoscaling with min_replicas 0): /readyz is 503 and /v2/health/ready is 400."""
    from serve_app.core import ray_internals

    worker = {"autoscaling": {"min_replicas": 0, "max_replicas": 1, "look_back_period_s": 2, "metrics_interval_s": 1}}
    url = deploy("zero", tiny_args(tiny_registry, replicas=1, worker=worker))
    try:
        assert client.get(f"{url}/healthz").status_code == 200
        ready = client.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "models": 5, "worker_replicas": 0}
        v2 = client.get(f"{url}/v2/health/ready")
        assert v2.status_code == 400 and v2.json() == {"ready": False}
    finally:
        ray_internals.delete_app_in_background("zero")


def test_preload_loads_registry_order_until_the_replica_is_full_and_survives_a_broken_one(
    client, deploy, tiny_dir, tmp_path
):
    """preload on broken, alpha, beta and gamma: the broken one fails (the replica starts anyway), alpha and beta
    fill the replica's two slots, gamma is not loaded. All before any request."""
    from serve_app.core import ray_internals

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    models = {"broken": ("text-classification", broken)}
    models |= {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma"]}
    registry = write_registry(tmp_path / "registry.json", models, preload=["broken", "alpha", "beta", "gamma"])
    url = deploy("preload", tiny_args(registry, replicas=1))
    try:
        listing = client.get(f"{url}/models").json()
        states = {m["id"]: (m["state"], m["load_count"], m["last_used_at"]) for m in listing["models"]}
        assert states == {
            "broken": ("failed", 0, None),
            "alpha": ("loaded", 1, None),
            "beta": ("loaded", 1, None),
            "gamma": ("not_loaded", 0, None),
        }
        assert [(r["models"], r["slots"], r["threads"]) for r in listing["replicas"]] == [(["alpha", "beta"], 2, 1)]
    finally:
        ray_internals.delete_app_in_background("preload")


def test_a_preloaded_model_is_loaded_before_any_request(authed, limits_url):
    # No request in the session names 'beta' on this app; it was loaded when the replica started
    # (other tests may have evicted it since).
    info = authed.get(f"{limits_url}/models/beta").json()
    assert info["preload"] is True
    assert info["load_count"] >= 1 and info["last_loaded_at"] is not None
    assert info["last_used_at"] is None
    assert authed.get(f"{limits_url}/models/alpha").json()["preload"] is False


def test_model_status_comes_from_the_replicas(authed, admin, limits_url):
    # alpha loaded, then unloaded: the replica keeps its record of it, not loaded now; gamma not loaded either
    assert admin.post(f"{limits_url}/models/alpha/load").json()["state"] == "loaded"
    for model_id in ("alpha", "gamma"):
        assert admin.post(f"{limits_url}/models/{model_id}/unload").json()["state"] == "not_loaded"
    t0 = time.time()
    assert authed.post(f"{limits_url}/predict", json={"model_id": "gamma", "input_data": "hi"}).status_code == 200

    def gamma():
        return authed.get(f"{limits_url}/models/gamma").json()

    assert wait_for(lambda: gamma()["state"] == "loaded" and gamma()["last_used_at"] is not None)  # within ~1 s
    info = gamma()
    assert info["loaded"] is True and len(info["replicas"]) == 1
    assert info["load_count"] >= 1
    assert info["last_loaded_at"] >= t0 - 1 and info["last_load_seconds"] > 0
    assert info["last_used_at"] >= info["last_loaded_at"]
    listing = authed.get(f"{limits_url}/models").json()
    (replica,) = listing["replicas"]
    # One replica: the models the listing says are loaded are exactly those it holds, each on it.
    loaded = {m["id"]: m["replicas"] for m in listing["models"] if m["state"] == "loaded"}
    assert "gamma" in replica["models"] and set(loaded) == set(replica["models"]), (loaded, replica["models"])
    assert {m["id"]: m["state"] for m in listing["models"]}["alpha"] == "not_loaded"
    assert all(holders == [replica["replica_id"]] for holders in loaded.values()), loaded


def test_explicit_load_and_unload(admin, limits_url):
    for model_id in ["alpha", "gamma", "delta"]:  # three loads on the one replica: the cap holds for them too
        r = admin.post(f"{limits_url}/models/{model_id}/load")
        assert r.status_code == 200 and r.json()["state"] == "loaded" and r.json()["loaded"] is True
    (replica,) = admin.get(f"{limits_url}/models").json()["replicas"]
    assert sorted(replica["models"]) == ["delta", "gamma"]  # alpha, the least recently used, went
    r = admin.post(f"{limits_url}/models/delta/unload")
    assert r.status_code == 200 and r.json()["state"] == "not_loaded" and r.json()["replicas"] == []
    assert all("delta" not in rep["models"] for rep in admin.get(f"{limits_url}/models").json()["replicas"])
    assert admin.post(f"{limits_url}/models/nope/load").status_code == 404


def test_request_id_is_taken_returned_and_logged_by_ingress_and_worker(authed, limits_url):
    """In throughput-optimized mode Serve buffers request logs; the app flushes them every second, so the
    request's lines reach both replicas' log files."""
    from serve_app.core import ray_internals

    r = authed.post(
        f"{limits_url}/predict",
        json={"model_id": "alpha", "input_data": "hi"},
        headers={"X-Request-ID": "trace-me-7f3a"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-me-7f3a"
    generated = authed.post(f"{limits_url}/predict", json={"model_id": "alpha", "input_data": "hi"})
    assert generated.headers.get("x-request-id")

    def logged_by() -> set[str]:
        found = set()
        for path in (ray_internals.logs_dir() / "serve").glob("replica_limits_*.log"):
            if "trace-me-7f3a" in path.read_text(errors="replace"):
                found.add(
                    "Ingress"
                    if "_Ingress_" in path.name
                    else "ModelWorker"
                    if "_ModelWorker_" in path.name
                    else path.name
                )
        return found

    assert wait_for(lambda: logged_by() >= {"Ingress", "ModelWorker"}), logged_by()


def test_metrics_count_known_traffic(authed, admin, limits_url, metrics_url):
    """Known traffic for 'epsilon' and 'cracked', models no other test touches, so every count starts at zero:
    exactly these counts reach Ray's Prometheus endpoint."""
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    # epsilon is cold: 1 load, then 4 cache hits; 1 request refused with 422; 1 over v2; 1 unload.
    ok = [authed.post(f"{limits_url}/predict", json={"model_id": "epsilon", "input_data": "hi"}) for _ in range(5)]
    assert [r.status_code for r in ok] == [200] * 5
    assert (
        authed.post(f"{limits_url}/predict", json={"model_id": "epsilon", "input_data": ["x"] * 9}).status_code == 422
    )
    assert authed.post(f"{limits_url}/v2/models/epsilon/infer", json=v2).status_code == 200
    assert admin.post(f"{limits_url}/models/epsilon/unload").status_code == 200
    # cracked fails to load once (the back-off answers the second request); an unknown model is one tag.
    assert [
        authed.post(f"{limits_url}/predict", json={"model_id": "cracked", "input_data": "hi"}).status_code
        for _ in range(2)
    ] == [503, 503]
    assert authed.post(f"{limits_url}/v2/models/no-such-model-x1/infer", json=v2).status_code == 404

    app = {"application": "limits"}
    expected = {
        ("ray_mms_requests_total", (("model", "epsilon"), ("api", "native"), ("status", "200"))): 5,
        ("ray_mms_request_errors_total", (("model", "epsilon"), ("api", "native"), ("status", "422"))): 1,
        ("ray_mms_requests_total", (("model", "epsilon"), ("api", "v2"), ("status", "200"))): 1,
        ("ray_mms_request_latency_ms_count", (("model", "epsilon"),)): 7,
        ("ray_mms_model_loads_total", (("model", "epsilon"), ("outcome", "ok"))): 1,
        ("ray_mms_model_load_latency_ms_count", (("model", "epsilon"),)): 1,
        ("ray_mms_model_cache_hits_total", (("model", "epsilon"),)): 5,  # 4 native and 1 v2
        ("ray_mms_model_unloads_total", (("model", "epsilon"),)): 1,
        ("ray_mms_model_loads_total", (("model", "cracked"), ("outcome", "error"))): 1,
        ("ray_mms_request_errors_total", (("model", "cracked"), ("status", "503"))): 2,
        ("ray_mms_request_errors_total", (("model", "(unknown)"), ("api", "v2"), ("status", "404"))): 1,
    }

    def scraped() -> dict:
        text = httpx.get(metrics_url, timeout=10).text
        return {key: metric_sum(text, key[0], **dict(key[1]), **app) for key in expected}

    assert wait_for(lambda: scraped() == expected, interval=1), scraped()
    assert (
        metric_sum(httpx.get(metrics_url, timeout=10).text, "ray_serve_num_http_requests_total") > 0
    )  # Ray's own stay on
