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


def _retries(app: str) -> int:
    """The requests the app's ingress replicas have run again after a worker replica died under them, from
    their logs."""
    from serve_app.core import ray_internals

    logs = (ray_internals.logs_dir() / "serve").glob(f"replica_{app}_Ingress_*.log")
    return sum(path.read_text(errors="replace").count(RETRIED) for path in logs)


def _slow_image() -> str:
    """A real PNG that takes the worker a while to decode (4000 x 4000, a gradient: 16 M pixels, within the
    pixel limits and a few hundred kB), base64: a replica decodes one image at a time
    (worker.max_concurrent_decodes), so several of them queue on the replica that holds the image model."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    ramp = np.tile(np.arange(4000, dtype=np.uint16) % 256, (4000, 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp.T, ramp // 2], axis=-1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_killed_worker_replica_is_replaced_and_every_request_meanwhile_is_answered(mixed_url, client):
    """Kill the worker replica that holds the image model while requests it accepted wait there for their
    turn to decode (the first of them has been answered: the others are still on it): the data plane runs
    them again on the other replica (the ingress's log says so), Serve starts a new replica, and every
    request, text traffic on both replicas included, before, during and after, gets a 200 from the model it
    named."""
    import os
    import signal
    import threading

    before = replica_pids("mixed")
    assert len(before) == 2
    retried = _retries("mixed")
    image = {"model_id": "pixels", "input_data": _slow_image()}
    assert client.post(f"{mixed_url}/predict", json=image).status_code == 200  # loaded, and reported

    def holder() -> str | None:
        listing = client.get(f"{mixed_url}/models").json()
        return next((m["replicas"][0] for m in listing["models"] if m["id"] == "pixels" and m["replicas"]), None)

    assert wait_for(lambda: holder() is not None)
    victim_id = holder()

    def text(c: httpx.Client, i: int):
        # Three text models: with the image model they fill the 2 replicas' 4 slots, so nothing is evicted
        # before the kill. With four, their churn evicted the image model from its holder (Ray's LRU: the
        # text models are used more recently), the images went to the other replica, and the kill found
        # none of them on the victim (2 runs in 7, run alone).
        model_id = MODELS[i % 3]
        r = c.post(f"{mixed_url}/predict", json={"model_id": model_id, "input_data": "hello"})
        return model_id, r.status_code, r.json()

    images: list[httpx.Response] = []
    first_answer = threading.Event()

    def send_image() -> None:
        with httpx.Client(timeout=120) as c:
            images.append(c.post(f"{mixed_url}/predict", json=image))
        first_answer.set()

    with Background(text, threads=4) as traffic:
        traffic.wait_until(40)  # traffic flows on both replicas
        senders = [threading.Thread(target=send_image) for _ in range(4)]
        for sender in senders:
            sender.start()
        assert first_answer.wait(120)  # one decoded and answered; the others wait on the holder for their turn
        os.kill(before[victim_id], signal.SIGKILL)  # a replica process this test session's Ray started
        for sender in senders:
            sender.join(120)
        assert wait_for(lambda: len(replica_pids("mixed")) == 2 and victim_id not in replica_pids("mixed"))
        served_when_replaced = len(traffic.results)
        traffic.wait_until(served_when_replaced + 40)  # and traffic flows on the new replica too
    statuses = Counter(status for _, status, _ in traffic.results)
    print(f"\nreplica {victim_id} killed; {len(traffic.results)} text requests meanwhile: {dict(statuses)}")
    assert statuses == {200: len(traffic.results)}, [b for _, s, b in traffic.results if s != 200][:3]
    for model_id, _, body in traffic.results:
        assert body["model_id"] == model_id and body["predictions"][0]["label"].startswith(f"{model_id}-")
    assert [r.status_code for r in images] == [200] * 4, [r.text for r in images if r.status_code != 200]
    assert all(r.json()["predictions"][0]["label"].startswith("pixels-") for r in images)
    # The images still on the victim when it died were answered by their second run, which the data plane
    # logs before it sends it (the ingress writes its log within a second).
    assert wait_for(lambda: _retries("mixed") > retried), "the data plane ran no request again"
