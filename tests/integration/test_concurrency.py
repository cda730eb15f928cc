"""Concurrent mixed traffic over two worker replicas: every answer comes from the model it named."""

import asyncio
import random
from collections import Counter

import httpx
import pytest

from tests.helpers import tiny_args, wait_for

pytestmark = pytest.mark.integration

MODELS = ["alpha", "beta", "gamma", "delta", "pixels"]


@pytest.fixture(scope="module")
def mixed_url(deploy, tiny_registry):
    from ray import serve

    yield deploy("mixed", tiny_args(tiny_registry, replicas=2))
    serve.delete("mixed")


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


def test_requests_go_to_the_replica_that_holds_the_model(client, mixed_url):
    # Warm one model, then check that repeated requests do not load it anywhere else.
    assert client.post(f"{mixed_url}/predict", json={"model_id": "beta", "input_data": "hi"}).status_code == 200
    assert wait_for(lambda: client.get(f"{mixed_url}/models/beta").json()["loaded"])
    holders = set(client.get(f"{mixed_url}/models/beta").json()["replicas"])
    for _ in range(20):
        assert client.post(f"{mixed_url}/predict", json={"model_id": "beta", "input_data": "hi"}).status_code == 200
    assert set(client.get(f"{mixed_url}/models/beta").json()["replicas"]) == holders


def test_a_killed_worker_replica_is_replaced_and_traffic_recovers(client, mixed_url):
    """Kill one worker replica's process in the middle of traffic: in-flight requests get a clean 503 or are
    retried by the ingress, Serve starts a new replica, and every later request succeeds."""
    import os
    import signal
    import threading
    import time

    from tests.helpers import replica_pids

    before = replica_pids("mixed")
    assert len(before) == 2
    statuses: list[int] = []
    bodies: list[dict] = []
    stop = threading.Event()

    def traffic():
        rng = random.Random(3)
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                model_id = rng.choice(MODELS[:4])
                r = c.post(f"{mixed_url}/predict", json={"model_id": model_id, "input_data": "hello"})
                statuses.append(r.status_code)
                bodies.append(r.json())

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim_id, victim_pid = sorted(before.items())[0]
    killed_at = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)  # a replica process this test session's Ray started
    recovered = wait_for(
        lambda: len(replica_pids("mixed")) == 2 and victim_id not in replica_pids("mixed"), timeout=120, interval=0.5
    )
    recovery_s = time.monotonic() - killed_at
    stop.set()
    for t in threads:
        t.join()
    print(
        f"\nreplica {victim_id} killed; a new replica was running after {recovery_s:.1f}s; "
        f"{len(statuses)} requests meanwhile: {dict(Counter(statuses))}"
    )
    assert recovered
    assert set(statuses) <= {200, 503}, Counter(statuses)
    assert all(b["error"] == "model_unavailable" for s, b in zip(statuses, bodies, strict=True) if s == 503)

    # Every later request succeeds.
    results = asyncio.run(_traffic(mixed_url, n=60, concurrency=8, seed=11))
    assert [r.status_code for _, _, r in results] == [200] * 60
