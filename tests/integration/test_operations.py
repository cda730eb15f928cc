"""Operating the app: model status from the replicas, explicit load and unload, health, preload,
request ids, and Prometheus metrics (against the 'limits' app, with its API key)."""

import time

import httpx
import pytest

from tests.helpers import metric_sum, wait_for

pytestmark = pytest.mark.integration


def test_health_and_readiness(limits_url):
    with httpx.Client(timeout=30) as c:
        assert c.get(f"{limits_url}/healthz").json() == {"status": "ok"}
        ready = c.get(f"{limits_url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["ready"] is True and ready.json()["worker_replicas"] == 1


def test_a_preloaded_model_is_loaded_before_any_request(authed, limits_url):
    # No request in the session names 'beta' on this app; it was loaded when the replica started
    # (other tests may have evicted it since).
    info = authed.get(f"{limits_url}/models/beta").json()
    assert info["preload"] is True
    assert info["load_count"] >= 1 and info["last_loaded_at"] is not None
    assert info["last_used_at"] is None
    assert authed.get(f"{limits_url}/models/alpha").json()["preload"] is False


def test_model_status_comes_from_the_replicas(authed, limits_url):
    t0 = time.time()
    assert authed.post(f"{limits_url}/predict", json={"model_id": "gamma", "input_data": "hi"}).status_code == 200
    info = authed.get(f"{limits_url}/models/gamma").json()
    assert info["state"] == "loaded" and info["loaded"] is True
    assert len(info["replicas"]) == 1
    assert info["load_count"] >= 1
    assert info["last_loaded_at"] >= t0 - 1 and info["last_load_seconds"] > 0
    assert info["last_used_at"] >= info["last_loaded_at"]
    listing = authed.get(f"{limits_url}/models").json()
    (replica,) = listing["replicas"]
    assert "gamma" in replica["models"] and len(replica["models"]) <= 2
    states = {m["id"]: m["state"] for m in listing["models"]}
    assert set(states.values()) <= {"not_loaded", "loading", "loaded", "failed"}


def test_explicit_load_and_unload(authed, admin, limits_url):
    r = admin.post(f"{limits_url}/models/delta/load")
    assert r.status_code == 200 and r.json()["state"] == "loaded"
    listing = authed.get(f"{limits_url}/models").json()
    assert all(len(rep["models"]) <= 2 for rep in listing["replicas"])  # the cap holds for explicit loads too
    r = admin.post(f"{limits_url}/models/delta/unload")
    assert r.status_code == 200
    assert wait_for(lambda: authed.get(f"{limits_url}/models/delta").json()["state"] == "not_loaded")
    assert admin.post(f"{limits_url}/models/nope/load").status_code == 404


def test_request_id_is_taken_returned_and_logged_by_ingress_and_worker(authed, limits_url):
    import glob

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

    logs = ray_internals.logs_dir()

    def logged_by() -> set[str]:
        found = set()
        for path in glob.glob(f"{logs}/serve/replica_limits_*.log"):
            with open(path, errors="replace") as f:
                if "trace-me-7f3a" in f.read():
                    found.add("Ingress" if "_Ingress_" in path else "ModelWorker" if "_ModelWorker_" in path else path)
        return found

    assert wait_for(lambda: logged_by() >= {"Ingress", "ModelWorker"}, timeout=10), logged_by()


def test_metrics_count_known_traffic(authed, admin, limits_url, metrics_url):
    def scraped() -> dict[str, float]:
        text = httpx.get(metrics_url, timeout=10).text
        app = {"application": "limits"}
        return {
            "ok": metric_sum(text, "ray_mms_requests_total", model="delta", status="200", **app),
            "err": metric_sum(text, "ray_mms_request_errors_total", model="delta", status="422", **app),
            "latency": metric_sum(text, "ray_mms_request_latency_ms_count", model="delta", **app),
            "loads": metric_sum(text, "ray_mms_model_loads_total", model="delta", outcome="ok", **app),
            "load_latency": metric_sum(text, "ray_mms_model_load_latency_ms_count", model="delta", **app),
            "hits": metric_sum(text, "ray_mms_model_cache_hits_total", model="delta", **app),
            "unloads": metric_sum(text, "ray_mms_model_unloads_total", model="delta", **app),
            "serve_builtin": metric_sum(text, "ray_serve_num_http_requests_total", **app),
        }

    def settled() -> dict[str, float]:  # the replicas report every second: wait until two scrapes agree
        previous = scraped()
        while True:
            time.sleep(2.5)
            current = scraped()
            if current == previous:
                return current
            previous = current

    admin.post(f"{limits_url}/models/delta/unload")
    before = settled()
    # Known traffic: delta is cold, so 1 load, then 4 cache hits; 1 request refused with 422; 1 unload.
    ok = [authed.post(f"{limits_url}/predict", json={"model_id": "delta", "input_data": "hi"}) for _ in range(5)]
    assert [r.status_code for r in ok] == [200] * 5
    assert authed.post(f"{limits_url}/predict", json={"model_id": "delta", "input_data": ["x"] * 9}).status_code == 422
    assert admin.post(f"{limits_url}/models/delta/unload").status_code == 200
    expected = {"ok": 5, "err": 1, "latency": 6, "loads": 1, "load_latency": 1, "hits": 4, "unloads": 1}

    def increments() -> dict[str, float]:
        now = scraped()
        return {k: now[k] - before[k] for k in expected}

    assert wait_for(lambda: increments() == expected, timeout=30, interval=1), increments()
    assert scraped()["serve_builtin"] > 0  # Ray Serve's own metrics stay on
