"""Two models per worker replica, the least recently used one unloaded first (one replica, tiny models)."""

import threading

import pytest

from tests.helpers import tiny_args, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lru_url(deploy, tiny_registry):
    from ray import serve

    yield deploy("lru", tiny_args(tiny_registry, replicas=1))
    serve.delete("lru")


def _predict(client, url, model_id):
    r = client.post(f"{url}/predict", json={"model_id": model_id, "input_data": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == model_id
    assert r.json()["predictions"][0]["label"].startswith(f"{model_id}-")


def _held(client, url) -> list[list[str]]:
    return [r["models"] for r in client.get(f"{url}/models").json()["replicas"]]


def _holds_exactly(client, url, expected: set[str]) -> bool:
    held = _held(client, url)
    return len(held) == 1 and set(held[0]) == expected


class _Watcher:
    """Polls GET /models while traffic runs and records the most models any replica held."""

    def __init__(self, client, url):
        self.client, self.url = client, url
        self.max_held = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import httpx

        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                for models in _held(c, self.url):
                    self.max_held = max(self.max_held, len(models))
                self.samples += 1
                self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_third_model_unloads_the_least_recently_used(client, lru_url):
    with _Watcher(client, lru_url) as watcher:
        _predict(client, lru_url, "alpha")
        _predict(client, lru_url, "beta")
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"alpha", "beta"}))
        _predict(client, lru_url, "gamma")
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"beta", "gamma"})), _held(client, lru_url)
    assert watcher.samples > 0
    assert watcher.max_held <= 2
    info = client.get(f"{lru_url}/models/alpha").json()
    assert info["loaded"] is False and info["replicas"] == []


def test_a_hit_makes_a_model_most_recently_used(client, lru_url):
    with _Watcher(client, lru_url) as watcher:
        for model_id in ["alpha", "beta", "alpha", "gamma"]:  # beta is now the least recently used
            _predict(client, lru_url, model_id)
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"alpha", "gamma"})), _held(client, lru_url)
        for model_id in ["delta", "pixels"]:
            body = {"model_id": model_id, "input_data": "samples/images/square.jpg" if model_id == "pixels" else "hi"}
            assert client.post(f"{lru_url}/predict", json=body).status_code == 200
        assert wait_for(lambda: _holds_exactly(client, lru_url, {"delta", "pixels"})), _held(client, lru_url)
    assert watcher.max_held <= 2


def test_a_model_evicted_while_its_request_runs_still_answers(client, lru_url):
    """Requests for three models at once through one replica: evictions happen under running requests."""
    import asyncio

    import httpx

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            bodies = [
                {"model_id": m, "input_data": ["hello world"] * 8}
                for _ in range(10)
                for m in ("alpha", "beta", "gamma")
            ]
            return await asyncio.gather(*(c.post(f"{lru_url}/predict", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(responses)
    for r in responses:
        model_id = r.json()["model_id"]
        assert all(p["label"].startswith(f"{model_id}-") for p in r.json()["predictions"])


def test_concurrent_first_requests_load_a_cold_model_once(client, lru_url):
    import asyncio

    import httpx

    client.post(f"{lru_url}/models/delta/unload")
    assert wait_for(lambda: not client.get(f"{lru_url}/models/delta").json()["loaded"])
    before = client.get(f"{lru_url}/models/delta").json()["load_count"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *(c.post(f"{lru_url}/predict", json={"model_id": "delta", "input_data": "hi"}) for _ in range(16))
            )

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 16
    assert client.get(f"{lru_url}/models/delta").json()["load_count"] == before + 1


def test_memory_is_stable_over_300_load_unload_cycles(client, lru_url):
    """RSS of the worker replica after 300 load/unload cycles stays within 15% of its RSS after 10."""
    from tests.helpers import replica_pids, rss_bytes

    (pid,) = replica_pids("lru").values()
    models = ["alpha", "beta", "gamma"]  # round-robin over 3 models with 2 slots: every request loads and unloads

    def cycles(n: int, start: int) -> None:
        for i in range(start, start + n):
            _predict(client, lru_url, models[i % 3])

    cycles(2, 0)
    cycles(10, 2)
    after_10 = rss_bytes(pid)
    cycles(290, 12)
    after_300 = rss_bytes(pid)
    ratio = after_300 / after_10
    print(
        f"\nworker RSS after 10 cycles: {after_10 / 2**20:.1f} MiB, after 300: {after_300 / 2**20:.1f} MiB, "
        f"ratio {ratio:.3f}"
    )
    loads = sum(m["load_count"] for m in client.get(f"{lru_url}/models").json()["models"])
    assert loads >= 300
    assert ratio <= 1.15
