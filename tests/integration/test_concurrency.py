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
"""What the ingress logs each time it runs a request again because its worker replica died under it
(deployments/ingress/dataplane.py)."""

UNAVAILABLE = "Replica(id='{}', deployment='ModelWorker', app='{}') is temporarily unavailable"
"""What Serve's own router logs in the ingress when it sends a request again, elsewhere, because the replica it
chose cannot be reached (Ray raised ActorUnavailableError before the death was known)."""


def _retries(app: str, victim_id: str) -> int:
    """The requests the app's ingress replicas have run again after worker replica ``victim_id`` died, from their
    logs: by the data plane's retry, or by Serve's router before it knew the replica dead."""
    from serve_app.core import ray_internals

    logs = (ray_internals.logs_dir() / "serve").glob(f"replica_{app}_Ingress_*.log")
    texts = [path.read_text(errors="replace") for path in logs]
    return sum(t.count(RETRIED) + t.count(UNAVAILABLE.format(victim_id, app)) for t in texts)


def test_a_killed_worker_replica_is_replaced_and_every_request_meanwhile_is_answered(mixed_url):
    """Kill one worker replica's process in the middle of traffic: requests it held are run again on the
    other replica (the ingress's log says so), Serve starts a new replica, and every request, before, during
    and after, gets a 200 from the model it named."""
    import os
    import signal

    before = replica_pids("mixed")
    assert len(before) == 2
    victim_id, victim_pid = sorted(before.items())[0]
    retried = _retries("mixed", victim_id)

    def one(c: httpx.Client, i: int):
        model_id = MODELS[i]  # thread i asks for the i-th text model
        r = c.post(f"{mixed_url}/predict", json={"model_id": model_id, "input_data": "hello"})
        return model_id, r.status_code, r.json()

    with Background(one, threads=4) as traffic:
        traffic.wait_until(40)  # traffic flows on both replicas
        os.kill(victim_pid, signal.SIGKILL)  # a replica process this test session's Ray started
        assert wait_for(lambda: len(replica_pids("mixed")) == 2 and victim_id not in replica_pids("mixed"))
        served_when_replaced = len(traffic.results)
        traffic.wait_until(served_when_replaced + 40)  # and traffic flows on the new replica too
    statuses = Counter(status for _, status, _ in traffic.results)
    print(f"\nreplica {victim_id} killed; {len(traffic.results)} requests meanwhile: {dict(statuses)}")
    assert statuses == {200: len(traffic.results)}, [b for _, s, b in traffic.results if s != 200][:3]
    for model_id, _, body in traffic.results:
        assert body["model_id"] == model_id and body["predictions"][0]["label"].startswith(f"{model_id}-")
    # Requests were running on the killed replica, or sent to it before Serve knew it dead, and each of them
    # was answered by its second run (logged before it ran; the ingress writes its log within a second).
    assert wait_for(lambda: _retries("mixed", victim_id) > retried), "no request was run again: the kill hit none"
