"""The same application on a multi-node cluster: replicas on different nodes, routing by model, the cap per replica.

The cluster: a 1-CPU head and two 2-CPU nodes (tests/cluster/conftest.py).
"""

import asyncio
import random
from collections import Counter

import httpx
import pytest
from ray import serve

from serve_app.app import build_app
from serve_app.core import ray_internals
from serve_app.core.config import AppArgs
from tests.helpers import MODEL_ROOTS, wait_for

pytestmark = pytest.mark.cluster

MODELS = ["alpha", "beta", "gamma", "delta"]


def _args(tiny_registry, **worker) -> dict:
    return {
        "registry_path": str(tiny_registry),
        "auth": {"mode": "off"},
        "model_roots": MODEL_ROOTS,
        "worker": {"num_cpus": 0.5, "torch_threads": 1, **worker},
    }


@pytest.fixture(scope="module")
def spread_url(deploy, tiny_registry):
    yield deploy("spread", _args(tiny_registry, num_replicas=2, max_replicas_per_node=1))
    ray_internals.delete_app_in_background("spread")


def _listing(client, url):
    return client.get(f"{url}/models").json()


def test_max_replicas_per_node_holds_even_where_the_cluster_has_room_for_more(cluster_url, tiny_registry):
    """Four worker replicas at most one a node on three nodes: three run, one on each node, and Serve reports
    the fourth as one it cannot place, though the cluster's CPUs could hold all four (2 of its 5 CPUs)."""
    app = build_app(AppArgs.model_validate(_args(tiny_registry, num_replicas=4, max_replicas_per_node=1)))
    serve.run_many([serve.RunTarget(app, name="four", route_prefix="/four")], wait_for_applications_running=False)
    try:

        def replicas():
            return ray_internals.serve_instance_details()["applications"]["four"]["deployments"]["ModelWorker"][
                "replicas"
            ]

        def unplaceable_reported() -> bool:
            status = serve.status().applications.get("four")
            worker = status.deployments.get("ModelWorker") if status else None
            return worker is not None and "1 replicas that have taken more than 1s to be scheduled" in worker.message

        assert wait_for(lambda: sum(r["state"] == "RUNNING" for r in replicas()) == 3)
        assert wait_for(unplaceable_reported)
        running = [r for r in replicas() if r["state"] == "RUNNING"]
        assert len(running) == 3 and len({r["node_id"] for r in running}) == 3, running
        assert len(replicas()) == 4
    finally:
        ray_internals.delete_app_in_background("four")


def test_worker_replicas_land_on_different_nodes(client, spread_url):
    replicas = _listing(client, spread_url)["replicas"]
    assert len(replicas) == 2
    assert len({r["node_id"] for r in replicas}) == 2, replicas


def test_mixed_traffic_across_nodes_keeps_the_cap_and_the_models_straight(client, spread_url):
    async def traffic():
        rng = random.Random(5)
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as c:

            async def one(model_id):
                async with sem:
                    return model_id, await c.post(
                        f"{spread_url}/predict", json={"model_id": model_id, "input_data": "hello world"}
                    )

            return await asyncio.gather(*(one(rng.choice(MODELS)) for _ in range(200)))

    results = asyncio.run(traffic())
    assert Counter(r.status_code for _, r in results) == {200: 200}
    for model_id, r in results:
        assert r.json()["model_id"] == model_id
        assert r.json()["predictions"][0]["label"].startswith(f"{model_id}-")
    assert wait_for(lambda: all(len(r["models"]) <= 2 for r in _listing(client, spread_url)["replicas"]))


def test_requests_for_a_model_go_to_the_node_that_holds_it(client, spread_url):
    """Held by one replica of the two (unloaded everywhere first: the test before may have left it on both),
    it stays on that one: no other replica loads it, however many requests come one after another."""
    assert client.post(f"{spread_url}/models/alpha/unload").status_code == 200
    assert client.post(f"{spread_url}/predict", json={"model_id": "alpha", "input_data": "hi"}).status_code == 200
    assert wait_for(lambda: client.get(f"{spread_url}/models/alpha").json()["loaded"])
    before = client.get(f"{spread_url}/models/alpha").json()
    assert len(before["replicas"]) == 1
    for _ in range(30):
        assert client.post(f"{spread_url}/predict", json={"model_id": "alpha", "input_data": "hi"}).status_code == 200
    after = client.get(f"{spread_url}/models/alpha").json()
    assert after["replicas"] == before["replicas"]
    assert after["load_count"] == before["load_count"]  # no other replica loaded it: every request went to a holder
