"""More models than memory, against the real app: each copy's size measured and shown, a memory budget per
worker replica (worker.memory_bytes, reserved with Ray), loads that evict by bytes first, a model larger than
the budget refused while the others serve, and copies still in use counted until they are freed.

The 'memory' app has one worker replica of 2 GiB and models of declared sizes that allocate nothing
(tests.byo_runtimes:Sized), so that the rules are tested whatever this machine's baseline: about 600 MiB
of the 2 GiB, which leaves a budget of 1.2 to 1.6 GB: a 900 MB and a 100 MB model fit together, two of
900 MB do not, and one of 3 GB never fits."""

import json
import threading

import httpx
import pytest

from serve_app.core import ray_internals
from tests.helpers import MODEL_ROOTS, wait_for

pytestmark = pytest.mark.integration

MB = 1000 * 1000
MEMORY = 2 * 1024**3


@pytest.fixture(scope="module")
def memory_base(tmp_path_factory):
    """The models' folder, and that of big1's gate (tests.byo_runtimes:Sized)."""
    return tmp_path_factory.mktemp("memory")


@pytest.fixture(scope="module")
def memory_url(deploy, memory_base):
    base = memory_base
    sized = "tests.byo_runtimes:Sized"

    def entry(model_id, size, **extra):
        return {
            "id": model_id,
            "task": "text-classification",
            "source": {"path": str(base)},
            "runtime": sized,
            "parameters": {"size": size, **extra},
        }

    models = [
        entry("big1", 900 * MB, gate=str(base / "big1-gate")),
        entry("big2", 900 * MB),
        entry("small", 100 * MB),
        entry("huge", 3000 * MB),
    ]
    (base / "registry.json").write_text(json.dumps({"models": models}))
    args = {
        "registry_path": str(base / "registry.json"),
        "auth": {"mode": "off"},
        "runtime_modules": ["tests.byo_runtimes"],
        "model_roots": MODEL_ROOTS,
        "worker": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 8, "memory_bytes": MEMORY},
    }
    return deploy("memory", args)


def predict(client, url, model_id, text="hello"):
    return client.post(f"{url}/predict", json={"model_id": model_id, "input_data": text})


def replica(client, url) -> dict:
    (only,) = client.get(f"{url}/models").json()["replicas"]
    return only


def test_the_budget_is_worker_memory_bytes_reserved_with_ray_less_the_replicas_baseline(client, memory_url):
    deployment = ray_internals.serve_instance_details()["applications"]["memory"]["deployments"]["ModelWorker"]
    assert deployment["deployment_config"]["ray_actor_options"]["memory"] == MEMORY
    memory = replica(client, memory_url)["memory"]
    assert memory["budget_bytes"] == MEMORY - memory["baseline_bytes"] and memory["baseline_bytes"] > 100 * MB
    assert memory["device"] == "cpu" and memory["resident_bytes"] >= memory["baseline_bytes"] // 2


def test_sizes_show_in_the_listing_and_the_repository_index_at_once(client, memory_url):
    assert predict(client, memory_url, "small").status_code == 200
    small = client.get(f"{memory_url}/models/small").json()  # no wait: the listing follows the load at once
    assert small["state"] == "loaded" and small["size_bytes"] == small["weights_bytes"] == 100 * MB
    assert small["rss_growth_bytes"] is not None and small["declared_bytes"] is None
    index = {m["name"]: m for m in client.post(f"{memory_url}/v2/repository/index").json()}
    assert index["small"]["size_bytes"] == 100 * MB and index["small"]["state"] == "READY"
    assert replica(client, memory_url)["memory"]["used_bytes"] >= 100 * MB


def test_a_load_over_the_budget_evicts_first_and_two_large_models_are_never_held_together(client, memory_url):
    for model_id in ("big1", "small", "big2", "big1", "big2"):
        assert predict(client, memory_url, model_id).status_code == 200
        held = replica(client, memory_url)
        assert not {"big1", "big2"} <= set(held["models"]), held["models"]  # never both: 1.8 GB
        assert held["memory"]["used_bytes"] <= held["memory"]["budget_bytes"]
    counters = replica(client, memory_url)["counters"]
    # Each big one evicted the other: chosen by the router (it knows their sizes once measured), or by the
    # replica inside the load (the first time, when no size was known).
    assert counters["evicted_for_memory"] + counters["evicted_by_router"] >= 3


def test_a_model_larger_than_the_budget_is_refused_with_its_size_and_the_others_keep_serving(client, memory_url):
    r = predict(client, memory_url, "huge")
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
    message = r.json()["message"]
    assert f"a copy takes {3000 * MB} bytes, more than this replica's memory budget for models" in message
    assert predict(client, memory_url, "small").status_code == 200
    assert client.get(f"{memory_url}/models/huge").json()["state"] == "failed"


def test_a_copy_still_in_use_counts_until_freed_so_a_load_that_needs_its_memory_waits_for_it(
    client, memory_url, memory_base
):
    """big1 answers a slow request (it runs until the test opens big1's gate); big2 needs big1's memory: it
    evicts big1, which lingers while its request runs, and waits for it to be freed. big2's answer comes
    after the slow request's, never beside it."""
    assert predict(client, memory_url, "big1").status_code == 200
    done: list[str] = []
    counters = replica(client, memory_url)["counters"]

    def send(model_id: str, text: str) -> None:
        with httpx.Client(timeout=120) as c:
            done.append(f"{model_id} {predict(c, memory_url, model_id, text).status_code}")

    slow = threading.Thread(target=send, args=("big1", "slow request"))
    slow.start()
    # The slow request is on the replica (it waits at the gate) before big2 is asked for.
    assert wait_for(lambda: replica(client, memory_url)["counters"]["requests"] > counters["requests"])
    big2 = threading.Thread(target=send, args=("big2", "hello"))
    big2.start()
    waited = counters["waited_for_memory"]
    assert wait_for(lambda: replica(client, memory_url)["counters"]["waited_for_memory"] == waited + 1)
    assert done == []  # big2 waits for big1's memory while the slow request runs on big1
    (memory_base / "big1-gate").touch()
    slow.join()
    big2.join()
    assert done == ["big1 200", "big2 200"]


def test_v2_readiness_follows_a_predict_that_loaded_the_model_at_once(memory_url, client):
    client.post(f"{memory_url}/models/small/unload")
    assert wait_for(lambda: not client.get(f"{memory_url}/models/small").json()["loaded"])
    assert client.get(f"{memory_url}/v2/models/small/ready").json()["ready"] is False
    assert predict(client, memory_url, "small").status_code == 200
    assert client.get(f"{memory_url}/v2/models/small/ready").json()["ready"] is True  # no wait for a report
