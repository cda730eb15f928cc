"""Two models per worker replica, the least recently used one unloaded first (one replica, tiny models)."""

import threading

import pytest

from helpers import tiny_args, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lru_url(deploy, tiny_registry):
    return deploy("lru", tiny_args(tiny_registry, replicas=1))


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
