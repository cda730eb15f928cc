"""Two models per worker replica, the least recently used one unloaded first (one replica, tiny models)."""

import asyncio

import httpx
import pytest

from demo.tiny_models import build_text_model, write_registry
from tests.helpers import Background, replica_pids, replicas, rss_bytes, tiny_args, wait_for

pytestmark = pytest.mark.integration

FAT = ["fat0", "fat1", "fat2"]
FAT_DENSE = 200_000  # a feed-forward layer of 2 x 200,000 x 16 floats: 25.6 MB that every prediction reads


@pytest.fixture(scope="module")
def lru_url(deploy, tiny_dir, tmp_path_factory):
    from serve_app.core import ray_internals

    base = tmp_path_factory.mktemp("lru")
    models = {name: ("text-classification", tiny_dir / name) for name in ["alpha", "beta", "gamma", "delta"]}
    models["pixels"] = ("image-classification", tiny_dir / "pixels")
    for seed, name in enumerate(FAT):
        models[name] = ("text-classification", build_text_model(base / name, name, seed=seed, dense_size=FAT_DENSE))
    yield deploy("lru", tiny_args(write_registry(base / "registry.json", models), replicas=1))
    ray_internals.delete_app_in_background("lru")


def _predict(client, url, model_id):
    r = client.post(f"{url}/predict", json={"model_id": model_id, "input_data": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == model_id
    assert r.json()["predictions"][0]["label"].startswith(f"{model_id}-")


def _held(client, url) -> list[list[str]]:
    return [r["models"] for r in replicas(client, url)]


def _holds_exactly(client, url, expected: set[str]) -> bool:
    held = _held(client, url)
    return len(held) == 1 and set(held[0]) == expected


def _counters(client, url) -> dict:
    (replica,) = replicas(client, url)
    return replica["counters"]


def _watch(url):
    """GET /models in a loop while traffic runs: each sample is how many models each replica held."""
    return Background(lambda c, i: [len(m) for m in _held(c, url)], threads=1)


def test_third_model_unloads_the_least_recently_used(client, lru_url):
    with _watch(lru_url) as watcher:
        _predict(client, lru_url, "alpha")
        _predict(client, lru_url, "beta")
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"alpha", "beta"}))
        _predict(client, lru_url, "gamma")
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"beta", "gamma"})), _held(client, lru_url)
    assert watcher.results, "the watcher took no sample"
    assert max(max(sample) for sample in watcher.results) <= 2
    info = client.get(f"{lru_url}/models/alpha").json()
    assert info["loaded"] is False and info["replicas"] == []


def test_a_hit_makes_a_model_most_recently_used(client, lru_url):
    with _watch(lru_url) as watcher:
        for model_id in ["alpha", "beta", "alpha", "gamma"]:  # beta is now the least recently used
            _predict(client, lru_url, model_id)
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"alpha", "gamma"})), _held(client, lru_url)
        for model_id in ["delta", "pixels"]:
            body = {"model_id": model_id, "input_data": "samples/images/square.jpg" if model_id == "pixels" else "hi"}
            assert client.post(f"{lru_url}/predict", json=body).status_code == 200
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"delta", "pixels"})), _held(client, lru_url)
    assert watcher.results and max(max(sample) for sample in watcher.results) <= 2


def test_a_model_evicted_while_its_request_runs_still_answers(client, lru_url):
    """Requests for three models at once through one replica of two slots: the replica's own counters show
    that evictions hit models that running requests still held, and every request is answered by its model."""

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            bodies = [
                {"model_id": m, "input_data": ["hello world"] * 8}
                for _ in range(10)
                for m in ("alpha", "beta", "gamma")
            ]
            return await asyncio.gather(*(c.post(f"{lru_url}/predict", json=b) for b in bodies))

    start = _counters(client, lru_url)["evicted_in_use"]
    for _ in range(5):  # each burst very likely evicts under a running request; the counter shows when it did
        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * len(responses)
        for r in responses:
            model_id = r.json()["model_id"]
            assert all(p["label"].startswith(f"{model_id}-") for p in r.json()["predictions"])
        if wait_for(lambda: _counters(client, lru_url)["evicted_in_use"] > start, timeout=3):
            break
    counters = _counters(client, lru_url)
    assert counters["evicted_in_use"] > start, counters
    # Evicted models are freed once their requests finish: at most the two held stay in memory.
    assert wait_for(lambda: _counters(client, lru_url)["live_models"] <= 2), _counters(client, lru_url)


def test_concurrent_first_requests_load_a_cold_model_once(client, lru_url):
    client.post(f"{lru_url}/models/delta/unload")
    assert wait_for(lambda: not client.get(f"{lru_url}/models/delta").json()["loaded"])
    before = client.get(f"{lru_url}/models/delta").json()["load_count"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *(c.post(f"{lru_url}/predict", json={"model_id": "delta", "input_data": "hi"}) for _ in range(16))
            )

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 16
    assert wait_for(lambda: client.get(f"{lru_url}/models/delta").json()["load_count"] == before + 1)
    assert client.get(f"{lru_url}/models/delta").json()["load_count"] == before + 1


def _loads(client, url, models) -> int:
    return sum(m["load_count"] for m in client.get(f"{url}/models").json()["models"] if m["id"] in models)


def test_memory_is_stable_over_many_load_unload_cycles(client, lru_url):
    """Three 25.6 MB models through two slots, round robin: every request loads one and evicts one. The worker
    replica's RSS after 60 more cycles stays within 15 % of its RSS after 12, where keeping every evicted
    model would add 1.5 GB; and only the two held models' weights are alive. Each RSS is read once the
    replica has freed every copy it evicted (frees run in threads, after the request that evicted)."""
    (pid,) = replica_pids("lru").values()

    def cycles(n: int, start: int) -> None:
        for i in range(start, start + n):
            _predict(client, lru_url, FAT[i % 3])

    def freed(loads: int) -> bool:
        """Whether a report that counts every load so far shows two copies alive: the evicted ones freed."""
        listing = client.get(f"{lru_url}/models").json()  # models and replicas from the same reports
        (replica,) = listing["replicas"]
        done = sum(m["load_count"] for m in listing["models"] if m["id"] in FAT) - loads_before == loads
        return done and replica["counters"]["live_models"] == 2 and replica["memory"]["lingering_bytes"] == 0

    loads_before = _loads(client, lru_url, FAT)
    cycles(12, 0)
    assert wait_for(lambda: freed(12)), _counters(client, lru_url)  # every request of this test loaded
    after_12 = rss_bytes(pid)
    cycles(60, 12)
    assert wait_for(lambda: freed(72)), _counters(client, lru_url)
    after_72 = rss_bytes(pid)
    ratio = after_72 / after_12
    print(f"\nworker RSS after 12 cycles: {after_12 / 2**20:.1f} MiB, after 72: {after_72 / 2**20:.1f} MiB")
    assert ratio <= 1.15
