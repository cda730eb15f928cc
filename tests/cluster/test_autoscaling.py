"""Autoscaling of the worker deployment: replicas go up under load and back down after it, no request fails."""

import time
from collections import Counter

import httpx
import pytest

from tests.helpers import MODEL_ROOTS, Background, replica_pids, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def autoscale_url(deploy, tiny_registry):
    from serve_app.core import ray_internals

    yield deploy(
        "autoscale",
        {
            "registry_path": str(tiny_registry),
            "auth": {"mode": "off"},
            "model_roots": MODEL_ROOTS,
            "worker": {
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 3,
                    "look_back_period_s": 2,
                    "metrics_interval_s": 0.5,
                },
                "num_cpus": 0.5,
                "max_ongoing_requests": 8,
                "torch_threads": 1,
            },
        },
    )
    ray_internals.delete_app_in_background("autoscale")


def test_replicas_scale_up_under_load_and_down_after(client, autoscale_url):
    assert len(replica_pids("autoscale")) == 1

    def load(c: httpx.Client, i: int) -> int:
        body = {"model_id": ["alpha", "beta"][i % 2], "input_data": ["hello world"] * 8}
        return c.post(f"{autoscale_url}/predict", json=body).status_code

    t0 = time.monotonic()
    with Background(load, threads=12) as traffic:
        scaled_up = wait_for(lambda: len(replica_pids("autoscale")) == 2, interval=0.5)
        up_s = time.monotonic() - t0
    assert scaled_up, "no second replica under load"
    t1 = time.monotonic()
    scaled_down = wait_for(lambda: len(replica_pids("autoscale")) == 1, interval=0.5)
    down_s = time.monotonic() - t1
    statuses = Counter(traffic.results)
    print(f"\nscaled 1 -> 2 replicas after {up_s:.1f}s of load, 2 -> 1 after {down_s:.1f}s idle: {dict(statuses)}")
    assert scaled_down, "the extra replica stayed after the load stopped"
    assert statuses == {200: len(traffic.results)} and len(traffic.results) > 0
    # And it still answers.
    assert client.post(f"{autoscale_url}/predict", json={"model_id": "gamma", "input_data": "hi"}).status_code == 200
