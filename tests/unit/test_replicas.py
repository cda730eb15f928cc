"""The ingress's view of the worker replicas: one snapshot per second for probes and listings, fresh on
demand, and a replica that does not answer falls back to what Serve's router knows of it."""

import asyncio

import pytest

from deployments.ingress import replicas as replicas_module
from deployments.ingress.replicas import ReplicaDirectory
from serve_app.core import ray_internals
from serve_app.core.schemas import ModelState


class FakeActor:
    def __init__(self, stats=None, error=None):
        self.calls, self._stats, self._error = 0, stats, error

    @property
    def record_routing_stats(self):
        actor = self

        class _Method:
            async def remote(self):
                actor.calls += 1
                if actor._error:
                    raise actor._error
                return actor._stats

        return _Method()


@pytest.fixture
def fake_serve(monkeypatch):
    refs = [
        ray_internals.ReplicaRef("r1", "n1", "actor-1", ("alpha",)),
        ray_internals.ReplicaRef("r2", "n2", "actor-2", ("beta", "gamma")),
    ]
    actors = {
        "actor-1": FakeActor({"models": {"alpha": {"state": "loaded", "load_count": 1}}, "counters": {"requests": 7}}),
        "actor-2": FakeActor(error=TimeoutError("replica is starting")),
    }
    listed = []

    async def running_replicas(app, deployment):
        listed.append((app, deployment))
        return refs

    async def replica_actor(name):
        return actors[name]

    monkeypatch.setattr(ray_internals, "running_replicas", running_replicas)
    monkeypatch.setattr(ray_internals, "replica_actor", replica_actor)
    return listed, actors


def test_each_replica_reports_its_own_models_and_counters(fake_serve):
    r1, _ = asyncio.run(ReplicaDirectory("app", "ModelWorker").statuses())
    assert r1.replica_id == "r1" and r1.node_id == "n1"
    assert r1.models["alpha"].state is ModelState.LOADED and r1.models["alpha"].load_count == 1
    assert r1.counters.requests == 7


def test_a_replica_that_does_not_answer_falls_back_to_the_models_the_router_knows(fake_serve):
    (_, r2) = asyncio.run(ReplicaDirectory("app", "ModelWorker").statuses())
    assert r2.held == ["beta", "gamma"] and all(s.state is ModelState.LOADED for s in r2.models.values())


def test_probes_and_listings_share_one_snapshot_a_second_unless_fresh_is_asked(fake_serve, monkeypatch):
    listed, actors = fake_serve
    directory = ReplicaDirectory("app", "ModelWorker")

    async def many():
        for _ in range(20):
            await directory.statuses()
        await directory.statuses(fresh=True)

    asyncio.run(many())
    assert len(listed) == 2 and actors["actor-1"].calls == 2
    monkeypatch.setattr(replicas_module, "FRESH_S", 0.0)
    asyncio.run(directory.statuses())
    assert len(listed) == 3
