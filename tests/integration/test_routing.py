"""Model-aware routing on two worker replicas of two slots each (deployments/routing), seen over HTTP.

A hot model gets a copy on the other replica under load, and the copy goes once the load has stopped;
misses go to a free slot first, then to the replica whose least recently used model is coldest, and not
behind another model's load under way; an unload reaches every copy; and no replica ever holds more than two
models.
"""

import asyncio
import json
import threading

import httpx
import pytest

from demo.tiny_models import build_text_model, write_registry
from tests.helpers import Background, replicas, tiny_args, wait_for

pytestmark = pytest.mark.integration

MODELS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
GATE = "open-gated-load"


@pytest.fixture(scope="module")
def routing_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("routing")


@pytest.fixture(scope="module")
def routing_url(deploy, tiny_dir, routing_dir):
    from serve_app.core import ray_internals

    base = routing_dir
    models = {name: ("text-classification", tiny_dir / name) for name in MODELS[:4]}
    for seed, name in enumerate(MODELS[4:], start=4):
        models[name] = ("text-classification", build_text_model(base / name, name, seed=seed))
    registry = json.loads(write_registry(base / "registry.json", models).read_text())
    gated = {  # a model of the tests' own whose load waits for a file (GATE) that a test creates
        "id": "gated",
        "task": "text-classification",
        "source": {"path": str(base)},
        "runtime": "tests.byo_runtimes:Sized",
        "parameters": {"size": 1000, "load_gate": str(base / GATE)},
    }
    (base / "registry.json").write_text(json.dumps({"models": [*registry["models"], gated]}))
    args = tiny_args(base / "registry.json", replicas=2, runtime_modules=["tests.byo_runtimes"])
    yield deploy("routing", args)
    ray_internals.delete_app_in_background("routing")


def _held(client, url) -> list[frozenset[str]]:
    return [frozenset(r["models"]) for r in replicas(client, url)]


def _unload_everything(client, url) -> None:
    for model_id in MODELS:
        assert client.post(f"{url}/models/{model_id}/unload").json()["replicas"] == []
    assert wait_for(lambda: _held(client, url) == [frozenset(), frozenset()])


def _predict(client, url, model_id):
    r = client.post(f"{url}/predict", json={"model_id": model_id, "input_data": "hello world"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith(f"{model_id}-"), r.text
    return r


def _burst(url, model_id, requests=96, concurrency=16):
    async def run():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120) as c:

            async def one():
                async with sem:
                    return await c.post(
                        f"{url}/predict", json={"model_id": model_id, "input_data": ["hello world"] * 8}
                    )

            return await asyncio.gather(*(one() for _ in range(requests)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * requests
    assert all(r.json()["predictions"][0]["label"].startswith(f"{model_id}-") for r in responses)


def _watch(url):
    """GET /models in a loop while a test runs: each sample is how many models each replica held."""
    return Background(lambda c, i: [len(r["models"]) for r in replicas(c, url)], threads=1)


def _counts(client, url) -> dict[str, int]:
    """Each replica's prediction requests since it started, as the replicas last reported them."""
    return {r["replica_id"]: r["counters"]["requests"] for r in replicas(client, url)}


def _requests(client, url) -> dict[str, int]:
    """Each replica's prediction requests since it started, once the reports have caught up."""
    from tests.helpers import settled

    return dict(settled(lambda: tuple(sorted(_counts(client, url).items()))))


SPREAD = "spreading model 'alpha' to replica "
"""What the router logs in the ingress when the policy puts a hot model's copy on one more replica
(deployments/routing/router.py)."""


def _spreads(app: str) -> int:
    """The spreads of 'alpha' the app's router has logged (Ray's default router, which can also load a second
    copy once a request has waited out its matching timeout, logs none)."""
    from serve_app.core import ray_internals

    logs = (ray_internals.logs_dir() / "serve").glob(f"replica_{app}_Ingress_*.log")
    return sum(path.read_text(errors="replace").count(SPREAD) for path in logs)


def test_a_hot_model_gets_a_copy_on_the_other_replica_and_the_copy_goes_after_the_load(client, routing_url):
    """The policy's choices, which Ray's default router does not make: a copy on the other replica once every
    holder has spread_at (4) requests in flight, before the holder is full (max_ongoing_requests: 8), which
    the router logs; then, the load gone, every request on the holder that served last, while the other copy
    ages."""
    spreads = _spreads("routing")
    _unload_everything(client, routing_url)
    with _watch(routing_url) as watcher:
        _predict(client, routing_url, "alpha")  # one holder, which every router knows of before the burst
        assert wait_for(lambda: sorted(map(len, _held(client, routing_url))) == [0, 1]), _held(client, routing_url)
        # 6 clients on alpha: up to 6 in flight on its holder, which takes 8 (Ray's router would never leave it)
        _burst(routing_url, "alpha", concurrency=6)
        assert wait_for(lambda: _held(client, routing_url) == [frozenset({"alpha"})] * 2), _held(client, routing_url)
        assert wait_for(lambda: _spreads("routing") > spreads), "the second copy was not the policy's spread"
        # The load stops: one request at a time, each goes where alpha ran last (Ray's router picks at random).
        before = _requests(client, routing_url)
        for _ in range(20):
            _predict(client, routing_url, "alpha")
        assert wait_for(lambda: sum(_counts(client, routing_url).values()) == sum(before.values()) + 20)
        after = _counts(client, routing_url)
        assert sorted(after[r] - before[r] for r in before) == [0, 20], (before, after)
        # Three other models arrive one at a time: two take the free slots, and the third evicts one of the
        # two alpha copies (a duplicate is worth half), not the only copy of anything.
        for model_id in ["beta", "gamma", "delta"]:
            _predict(client, routing_url, model_id)
        # (Wait for the whole outcome: a replica's report can fall between an eviction and the load after it.)
        assert wait_for(lambda: _one_alpha_and_all_four(_held(client, routing_url))), _held(client, routing_url)
    assert watcher.results and max(max(sample) for sample in watcher.results) <= 2


def _one_alpha_and_all_four(held: list[frozenset[str]]) -> bool:
    return sum("alpha" in h for h in held) == 1 and set().union(*held) == {"alpha", "beta", "gamma", "delta"}


def test_an_unload_reaches_every_copy_of_a_model(client, routing_url):
    _unload_everything(client, routing_url)
    _burst(routing_url, "beta")
    assert wait_for(lambda: _held(client, routing_url) == [frozenset({"beta"})] * 2), _held(client, routing_url)
    r = client.post(f"{routing_url}/models/beta/unload")
    assert r.status_code == 200 and r.json()["state"] == "not_loaded" and r.json()["replicas"] == []
    # The listing after the answer's fresh look: within a second the same look, later the replicas' reports.
    assert wait_for(lambda: _held(client, routing_url) == [frozenset(), frozenset()]), _held(client, routing_url)


def test_misses_go_to_a_free_slot_then_to_the_replica_with_the_coldest_victim(client, routing_url):
    """One request at a time. alpha, beta, gamma, delta fill the four slots, spread over the two replicas;
    alpha and beta are used three times more. epsilon then evicts gamma, the coldest of the two replicas'
    least recently used models (used once, the longest ago), and zeta evicts delta (used once), not alpha
    (used four times). (That demand can outweigh recency is tests/unit/test_routing_policy.py's.)"""
    _unload_everything(client, routing_url)
    before = {m["id"]: m["load_count"] for m in client.get(f"{routing_url}/models").json()["models"]}
    with _watch(routing_url) as watcher:
        for model_id in ["alpha", "beta", "gamma", "delta"]:
            _predict(client, routing_url, model_id)
        assert wait_for(
            lambda: sorted(_held(client, routing_url), key=sorted) == [{"alpha", "gamma"}, {"beta", "delta"}]
        ), _held(client, routing_url)
        for model_id in ["alpha", "beta"] * 3:
            _predict(client, routing_url, model_id)
        _predict(client, routing_url, "epsilon")
        assert wait_for(
            lambda: sorted(_held(client, routing_url), key=sorted) == [{"alpha", "epsilon"}, {"beta", "delta"}]
        ), _held(client, routing_url)
        _predict(client, routing_url, "zeta")
        assert wait_for(
            lambda: sorted(_held(client, routing_url), key=sorted) == [{"alpha", "epsilon"}, {"beta", "zeta"}]
        ), _held(client, routing_url)
    assert watcher.results and max(max(sample) for sample in watcher.results) <= 2
    loads = {m["id"]: m["load_count"] for m in client.get(f"{routing_url}/models").json()["models"]}
    used = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    assert {m: loads[m] - before[m] for m in used} == dict.fromkeys(used, 1)  # each miss one load, where placed


def test_a_miss_does_not_wait_behind_another_models_load_under_way(client, routing_url, routing_dir):
    """A replica loads one model at a time. While 'gated' loads on one replica (its load waits until the test
    opens its gate), alpha and beta fill the other; gamma's miss then goes there too, evicting, rather than
    to the free slot beside the load, and is answered while that load still waits."""
    _unload_everything(client, routing_url)
    assert client.post(f"{routing_url}/models/gated/unload").status_code == 200
    gate = routing_dir / GATE
    answers: list[httpx.Response] = []

    def send_gated() -> None:
        with httpx.Client(timeout=180) as c:
            answers.append(c.post(f"{routing_url}/predict", json={"model_id": "gated", "input_data": "awake"}))

    sender = threading.Thread(target=send_gated)
    sender.start()
    try:
        loader: list[str] = []

        def found_loading() -> bool:
            loader[:] = [r["replica_id"] for r in replicas(client, routing_url) if "gated" in r["models"]]
            return client.get(f"{routing_url}/models/gated").json()["state"] == "loading" and len(loader) == 1

        assert wait_for(found_loading)
        for model_id in ["alpha", "beta", "gamma"]:
            _predict(client, routing_url, model_id)
            assert not answers  # answered while gated still loads
        held = {r["replica_id"]: set(r["models"]) for r in replicas(client, routing_url)}
        (other,) = set(held) - set(loader)
        assert "gamma" in held[other] and held[loader[0]] == {"gated"}, held
    finally:
        gate.touch()
        sender.join(180)
    assert [r.status_code for r in answers] == [200] and answers[0].json()["predictions"][0]["label"] == "awake"
    assert client.post(f"{routing_url}/models/gated/unload").status_code == 200


@pytest.fixture(scope="module")
def threads_base(tmp_path_factory):
    """The 'threads' app's folder, and that of its slow model's gate."""
    return tmp_path_factory.mktemp("threads")


@pytest.fixture(scope="module")
def threads_url(deploy, threads_base):
    """Two worker replicas on this node, one thread each; 'slow' answers an input starting with "slow" once
    the file ``slow-gate`` exists in ``threads_base`` (tests.byo_runtimes:Sized), 'fast' answers at once."""
    import json

    from serve_app.core import ray_internals

    base = threads_base
    sized = {"task": "text-classification", "source": {"path": str(base)}, "runtime": "tests.byo_runtimes:Sized"}
    models = [
        {"id": "slow", **sized, "parameters": {"size": 1000, "gate": str(base / "slow-gate")}},
        {"id": "fast", **sized, "parameters": {"size": 1000}},
    ]
    (base / "registry.json").write_text(json.dumps({"models": models}))
    args = tiny_args(base / "registry.json", replicas=2, runtime_modules=["tests.byo_runtimes"])
    yield deploy("threads", args)
    ray_internals.delete_app_in_background("threads")


def _by_model(client, url, settle: bool = True) -> dict[str, dict]:
    """Each model's replica: its counters, once the replicas' reports have caught up (two reads a few seconds
    apart agree), or as they are now (``settle=False``)."""
    from tests.helpers import settled

    def read():
        return tuple(
            (m, json.dumps({k: r["counters"][k] for k in COUNTED} | {"idle_threads": r["idle_threads"].get(m)}))
            for r in replicas(client, url)
            for m in r["models"]
        )

    return {m: json.loads(counted) for m, counted in (settled(read) if settle else read())}


COUNTED = ("requests", "batches", "idle_thread_offers", "extra_thread_batches")


def test_a_lone_request_on_an_idle_node_is_offered_its_idle_threads_and_not_while_the_node_is_busy(
    client, threads_url, threads_base
):
    """The router knows every replica's requests in flight. With both replicas of this node idle, a request's
    forward pass may run on their two threads; while the other replica runs a request, it keeps its one. The
    replica tries its model's lone requests both ways, the idle threads first, and reports the times."""
    for model_id in ("fast", "slow"):  # one on each replica
        assert (
            client.post(f"{threads_url}/predict", json={"model_id": model_id, "input_data": "warm"}).status_code == 200
        )
    before = _by_model(client, threads_url)
    assert set(before) == {"fast", "slow"}
    assert (before["fast"]["idle_thread_offers"], before["fast"]["extra_thread_batches"]) == (1, 1)  # 1st trial
    assert client.post(f"{threads_url}/predict", json={"model_id": "fast", "input_data": "alone"}).status_code == 200
    answers = []
    slow = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{threads_url}/predict", json={"model_id": "slow", "input_data": "slow one"}, timeout=120)
        )
    )
    slow.start()
    # The slow request is on the other replica (it waits at its gate) before the fast ones go.
    assert wait_for(
        lambda: _by_model(client, threads_url, settle=False)["slow"]["requests"] > before["slow"]["requests"]
    )
    for _ in range(3):
        r = client.post(f"{threads_url}/predict", json={"model_id": "fast", "input_data": "beside the slow one"})
        assert r.status_code == 200
    assert answers == []  # still running beside them
    (threads_base / "slow-gate").touch()
    slow.join()
    assert [a.status_code for a in answers] == [200]
    after = _by_model(client, threads_url)["fast"]
    assert after["requests"] - before["fast"]["requests"] == 4
    assert after["idle_thread_offers"] - before["fast"]["idle_thread_offers"] == 1  # not the three beside the slow one
    assert after["extra_thread_batches"] == 1  # the 2nd trial ran on the replica's own thread
    measured = after["idle_threads"]
    assert (measured["lone_batches"], measured["on_idle_threads"], measured["uses_idle_threads"]) == (2, 1, None)
    assert measured["idle_threads_ms"] > 0 and measured["own_threads_ms"] > 0
    assert max(r["counters"]["most_threads"] for r in replicas(client, threads_url)) == 2
