"""Concurrent mixed traffic over two worker replicas: every answer comes from the model it named."""

import asyncio
import random
from collections import Counter

import httpx
import pytest

from tests.helpers import Background, replica_pids, wait_for

pytestmark = pytest.mark.integration

MODELS = ["alpha", "beta", "gamma", "delta", "pixels"]


def _body(rng: random.Random, model_id: str) -> dict:
    if model_id == "pixels":
        return {
            "model_id": model_id,
            "input_data": f"samples/images/{rng.choice(['circle', 'square', 'triangle'])}.jpg",
        }
    n = rng.choice([1, 1, 3])
    texts = [
        " ".join(rng.choices(["free", "iphone", "hello", "movie", "great"], k=rng.randint(1, 8))) for _ in range(n)
    ]
    return {"model_id": model_id, "input_data": texts[0] if n == 1 else texts}


async def _traffic(url: str, n: int, concurrency: int, seed: int):
    rng = random.Random(seed)
    requests = [(m, _body(rng, m)) for m in rng.choices(MODELS, k=n)]
    sem = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(model_id, body):
            async with sem:
                r = await client.post(f"{url}/predict", json=body)
                return model_id, body, r

        return await asyncio.gather(*(one(m, b) for m, b in requests))


def test_concurrent_mixed_traffic_is_answered_by_the_named_models(client, mixed_url):
    results = asyncio.run(_traffic(mixed_url, n=500, concurrency=32, seed=7))
    statuses = Counter(r.status_code for _, _, r in results)
    failures = [r.text for _, _, r in results if r.status_code != 200]
    assert statuses == {200: 500}, failures[:3]
    for model_id, body, r in results:
        payload = r.json()
        assert payload["model_id"] == model_id
        n_inputs = 1 if isinstance(body["input_data"], str) else len(body["input_data"])
        assert len(payload["predictions"]) == n_inputs
        for p in payload["predictions"]:
            assert all(s["label"].startswith(f"{model_id}-") for s in p["scores"]), (model_id, p)

    def at_most_two_each():
        replicas = client.get(f"{mixed_url}/models").json()["replicas"]
        return len(replicas) == 2 and all(len(r["models"]) <= 2 for r in replicas)

    assert wait_for(at_most_two_each), client.get(f"{mixed_url}/models").json()["replicas"]


RETRIED = "worker replica died during a predict of"
"""What the ingress logs each time its data plane runs a request again because the worker replica it ran on
died under it (deployments/ingress/dataplane.py)."""


def _retries(app: str, model_id: str) -> int:
    """The requests for a model that the app's ingress replicas have run again after a worker replica died
    under them, from their logs."""
    from serve_app.core import ray_internals

    logs = (ray_internals.logs_dir() / "serve").glob(f"replica_{app}_Ingress_*.log")
    return sum(path.read_text(errors="replace").count(f"{RETRIED} {model_id!r}") for path in logs)


def _listed(client: httpx.Client, url: str) -> set[str]:
    """The worker replicas GET /models lists."""
    return {r["replica_id"] for r in client.get(f"{url}/models").json()["replicas"]}


def test_a_killed_worker_replica_is_replaced_and_every_request_meanwhile_is_answered(mixed_url, client):
    """Kill the worker replica on which a request is loading its model ('sleeper', whose load takes 8 s):
    the data plane runs that request again on another replica (the ingress's log says so), Serve starts a
    new replica, and every request, text traffic on both replicas included, before, during and after, gets
    a 200 from the model it named."""
    import os
    import signal
    import threading

    from serve_app.core import ray_internals

    before = replica_pids("mixed")
    assert len(before) == 2
    retried = _retries("mixed", "sleeper")
    # Serve's controller finds a dead replica at its next check of it: every health_check_period_s (the app's
    # 2 s, not Serve's 10), which is when the router and GET /models drop it and its replacement starts.
    deployments = ray_internals.serve_instance_details()["applications"]["mixed"]["deployments"]
    checks = {name: d["deployment_config"]["health_check_period_s"] for name, d in deployments.items()}
    assert {name: checks[name] for name in ("Ingress", "ModelWorker")} == {"Ingress": 2.0, "ModelWorker": 2.0}

    def text(c: httpx.Client, i: int):
        model_id = MODELS[i % 3]  # thread 3 sends what thread 0 does: three text models, no more in flight
        r = c.post(f"{mixed_url}/predict", json={"model_id": model_id, "input_data": "hello"})
        return model_id, r.status_code, r.json()

    loading: list[str] = []

    def found_loading() -> bool:
        """Whether a replica reports that it is loading 'sleeper' (the replicas report within a second)."""
        listing = client.get(f"{mixed_url}/models").json()
        if next(m for m in listing["models"] if m["id"] == "sleeper")["state"] == "loading":
            loading.extend(r["replica_id"] for r in listing["replicas"] if "sleeper" in r["models"])
        return bool(loading)

    answers: list[httpx.Response] = []

    def send_sleeper() -> None:
        with httpx.Client(timeout=120) as c:
            answers.append(c.post(f"{mixed_url}/predict", json={"model_id": "sleeper", "input_data": "awake"}))

    with Background(text, threads=4) as traffic:
        traffic.wait_until(40)  # traffic flows on both replicas
        sender = threading.Thread(target=send_sleeper)
        sender.start()
        assert wait_for(found_loading)
        victim_id = loading[0]
        os.kill(before[victim_id], signal.SIGKILL)  # a replica process this test session's Ray started
        assert wait_for(lambda: victim_id not in _listed(client, mixed_url))  # the dead replica leaves the listing
        sender.join(120)
        assert wait_for(lambda: len(replica_pids("mixed")) == 2 and victim_id not in replica_pids("mixed"))
        served_when_replaced = len(traffic.results)
        (new_id,) = set(replica_pids("mixed")) - set(before)

        def served_by_new_replica() -> int:
            replicas = client.get(f"{mixed_url}/models").json()["replicas"]
            return next((r["counters"]["requests"] for r in replicas if r["replica_id"] == new_id), 0)

        traffic.wait_until(served_when_replaced + 40)  # and traffic flows on the new replica too
        assert wait_for(lambda: served_by_new_replica() > 0)
    statuses = Counter(status for _, status, _ in traffic.results)
    print(f"\nreplica {victim_id} killed; {len(traffic.results)} text requests meanwhile: {dict(statuses)}")
    assert statuses == {200: len(traffic.results)}, [b for _, s, b in traffic.results if s != 200][:3]
    for model_id, _, body in traffic.results:
        assert body["model_id"] == model_id and body["predictions"][0]["label"].startswith(f"{model_id}-")
    assert [r.status_code for r in answers] == [200], [r.text for r in answers]
    assert answers[0].json()["predictions"][0]["label"] == "awake"
    # The request that died with its replica was answered by its second run, which the data plane logs
    # before it sends it (the ingress writes its log within a second).
    assert wait_for(lambda: _retries("mixed", "sleeper") == retried + 1), _retries("mixed", "sleeper")
