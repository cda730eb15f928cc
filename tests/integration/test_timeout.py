"""Timeouts: 504, the request's work on the replica is cancelled, a load it started still finishes (once),
and the app keeps answering.

Every 504 here is a request for a model that is not loaded, whose load takes far longer than the
deadline: the 'slow' app's request_timeout_s of 10 ms, or a client deadline of 1 ms (the Open Inference
Protocol's ``timeout`` parameter, in microseconds, as Triton's clients send it).
"""

import asyncio
import itertools

import httpx
import pytest

from tests.helpers import replicas, tiny_args, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_url(deploy, tiny_registry):
    from serve_app.core import ray_internals

    yield deploy("slow", tiny_args(tiny_registry, replicas=1, request_timeout_s=0.01))
    ray_internals.delete_app_in_background("slow")


def _status(client, url, model_id) -> dict:
    return client.get(f"{url}/models/{model_id}").json()


def test_a_prediction_over_the_timeout_is_504(client, slow_url):
    r = client.post(f"{slow_url}/predict", json={"model_id": "alpha", "input_data": "hello"})
    assert r.status_code == 504, r.text
    body = r.json()
    assert body == {"error": "timeout", "message": "Model 'alpha' did not answer within 0.01s", "model_id": "alpha"}


def test_a_request_that_times_out_on_the_replica_is_cancelled_there(client, demo_url):
    """A request queued on a worker replica behind a batch that runs for seconds (32 texts of 512 tokens on
    the demo sentiment model, one torch thread), with a 200 ms deadline: 504, and the replica counts it
    cancelled, while the long request still completes."""
    client.post(f"{demo_url}/models/sentiment/unload")
    assert wait_for(lambda: not _status(client, demo_url, "sentiment")["loaded"])
    counters = {r["replica_id"]: r["counters"] for r in replicas(client, demo_url)}
    long = {"model_id": "sentiment", "input_data": ["a long review of a film " * 800] * 32}
    short = {
        "parameters": {"timeout": 200_000},
        "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
    }

    async def both():
        async with httpx.AsyncClient(timeout=300) as c:
            first = asyncio.ensure_future(c.post(f"{demo_url}/predict", json=long))

            def holder():  # the replica the long request runs on, once it has started there
                held = [r for r in replicas(client, demo_url) if "sentiment" in r["models"]]
                return held[0]["replica_id"] if held else None

            assert await asyncio.to_thread(wait_for, lambda: holder() is not None)
            second = await c.post(f"{demo_url}/v2/models/sentiment/infer", json=short)
            return await first, second, holder()

    first, second, holder = asyncio.run(both())
    assert first.status_code == 200 and len(first.json()["predictions"]) == 32
    assert second.status_code == 504 and second.json() == {"error": "Model 'sentiment' did not answer within 0.2s"}

    def cancelled_on_holder() -> int:
        now = {r["replica_id"]: r["counters"] for r in replicas(client, demo_url)}
        return now[holder]["requests_cancelled"] - counters.get(holder, {}).get("requests_cancelled", 0)

    assert wait_for(lambda: cancelled_on_holder() == 1), cancelled_on_holder()


def test_a_cold_load_cut_short_by_a_timeout_finishes_once_and_is_not_left_loading(client, slow_url):
    """Three requests for a cold model, 10 ms each: 504s, and the load that the first of them to reach the
    replica started finishes: the model ends up loaded, by one load. (Under 10 ms a request may time out
    before it even reaches the replica: then the burst is sent again, for the next of three models. One that
    no request reached is still cold, so it can be tried again.)"""

    async def burst(model_id):
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model_id": model_id, "input_data": "hello"}
            return await asyncio.gather(*(c.post(f"{slow_url}/predict", json=body) for _ in range(3)))

    for model_id in itertools.islice(itertools.cycle(["beta", "gamma", "delta"]), 12):
        arrived_before = replicas(client, slow_url)[0]["counters"]["requests"]
        assert [r.status_code for r in asyncio.run(burst(model_id))] == [504] * 3
        if wait_for(lambda n=arrived_before: replicas(client, slow_url)[0]["counters"]["requests"] > n, timeout=5):
            break
    else:
        pytest.fail("no request of twelve bursts reached the replica within 10 ms")
    assert wait_for(lambda: _status(client, slow_url, model_id)["state"] == "loaded"), _status(
        client, slow_url, model_id
    )
    assert _status(client, slow_url, model_id)["load_count"] == 1


def test_a_client_deadline_times_a_request_out_and_the_app_still_answers(client, mixed_url):
    """A 1 ms client deadline on a cold model: 504 in the protocol's error shape. Then the same app, and the
    same model, answer predictions on both APIs."""
    mixed = mixed_url
    client.post(f"{mixed}/models/gamma/unload")
    assert wait_for(lambda: not _status(client, mixed, "gamma")["loaded"])
    infer = {
        "parameters": {"timeout": 1000},
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
    }
    r = client.post(f"{mixed}/v2/models/gamma/infer", json=infer)
    assert r.status_code == 504 and r.json() == {"error": "Model 'gamma' did not answer within 0.001s"}
    assert client.post(f"{mixed}/v2/models/gamma/infer", json={**infer, "parameters": {}}).status_code == 200
    r = client.post(f"{mixed}/predict", json={"model_id": "gamma", "input_data": "hello"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("gamma-")
    bad = client.post(f"{mixed}/v2/models/gamma/infer", json={**infer, "parameters": {"timeout": -5}})
    assert bad.status_code == 422 and "timeout" in bad.json()["error"]
