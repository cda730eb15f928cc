"""The ingress's view of the worker replicas, read from the router in this process: one snapshot per
second for probes and listings, each replica asked by name when a fresh look is needed or when it has not
reported yet, and a replica that does not answer shows what it pushed to the router."""

import asyncio
from types import SimpleNamespace

import pytest

from deployments.ingress import replicas as replicas_module
from deployments.ingress.replicas import ReplicaDirectory
from deployments.routing import views
from serve_app.core.schemas import ModelState


def running(replica_id, node_id, pushed, stats):
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=replica_id),
        node_id=node_id,
        multiplexed_model_ids=pushed,
        routing_stats=stats,
    )


class FakeWorker:
    """A DeploymentHandle whose ``status`` call, sent to one replica by name, answers for that replica (with
    its id, as a worker replica does, unless the answer names another)."""

    app_name, deployment_name = "app", "ModelWorker"

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    @property
    def status(self):
        worker = self

        class _Method:
            async def remote(self, on_replica=None):
                worker.asked.append(on_replica)
                answer = worker.answers[on_replica]
                if isinstance(answer, Exception):
                    raise answer
                return {"replica_id": on_replica, **answer}

        return _Method()


class FakeRouter(SimpleNamespace):
    """The router of this process, as views hands it out (weakly referenced, like the real one)."""


@pytest.fixture
def router():
    r = FakeRouter(
        replicas=[
            running(
                "r1",
                "n1",
                {"alpha"},
                {"models": {"alpha": {"state": "loaded", "load_count": 1}}, "counters": {"requests": 7}},
            ),
            running("r2", "n2", {"beta", "gamma"}, {}),  # started, not polled yet
        ]
    )
    views.register("app", "ModelWorker", r)
    return r


def test_each_replica_reports_its_own_models_and_counters_and_one_not_polled_yet_is_asked(router):
    worker = FakeWorker(
        {"r2": {"models": {"beta": {"state": "loaded", "load_count": 1}, "gamma": {"state": "failed"}}}}
    )
    r1, r2 = asyncio.run(ReplicaDirectory(worker).statuses())
    assert worker.asked == ["r2"]  # r1 has reported: nothing asked of it
    assert r1.replica_id == "r1" and r1.node_id == "n1" and r1.counters.requests == 7
    assert r1.models["alpha"].state is ModelState.LOADED and r1.models["alpha"].load_count == 1
    assert r2.models["beta"].load_count == 1 and r2.models["gamma"].state is ModelState.FAILED


def test_a_replica_not_polled_yet_that_does_not_answer_shows_what_it_pushed(router):
    _, r2 = asyncio.run(ReplicaDirectory(FakeWorker({"r2": TimeoutError()})).statuses())
    assert r2.held == ["beta", "gamma"]


def test_a_fresh_look_asks_each_replica_by_name_and_a_silent_one_falls_back(router):
    worker = FakeWorker({"r1": {"models": {"alpha": {"state": "not_loaded", "unload_count": 1}}}, "r2": TimeoutError()})
    r1, r2 = asyncio.run(ReplicaDirectory(worker).statuses(fresh=True))
    assert worker.asked == ["r1", "r2"]
    assert r1.models["alpha"].state is ModelState.NOT_LOADED and r1.held == []
    assert r2.held == ["beta", "gamma"]


def test_an_answer_from_another_replica_is_never_shown_as_the_replica_asked(router):
    """r1 is asked and r2 answers (its counters, its models): r1 shows what Serve last polled of it."""
    worker = FakeWorker(
        {"r1": {"replica_id": "r2", "counters": {"requests": 99}}, "r2": {"counters": {"requests": 99}}}
    )
    r1, r2 = asyncio.run(ReplicaDirectory(worker).statuses(fresh=True))
    assert r1.counters.requests == 7 and r1.held == ["alpha"]
    assert r2.counters.requests == 99


def test_a_fresh_answer_stands_until_serve_polls_the_replica_again(router, monkeypatch):
    """An unload's fresh look shows alpha gone; Serve's last poll of r1 (report 4) still has it. A later
    listing shows the fresh answer (report 5), not the poll before it, until Serve polls r1 again."""
    router.replicas[0].routing_stats = {"report": 4, "models": {"alpha": {"state": "loaded"}}}
    worker = FakeWorker({"r1": {"report": 5, "models": {"alpha": {"state": "not_loaded"}}}, "r2": {"report": 1}})
    directory = ReplicaDirectory(worker)
    monkeypatch.setattr(replicas_module, "FRESH_S", 0.0)
    assert asyncio.run(directory.statuses(fresh=True))[0].held == []
    r1, _ = asyncio.run(directory.statuses())
    assert r1.held == [] and r1.report == 5
    worker.answers["r1"] = TimeoutError()  # a fresh look that r1 does not answer: its later report stands
    r1, _ = asyncio.run(directory.statuses(fresh=True))
    assert r1.held == [] and r1.report == 5
    router.replicas[0].routing_stats = {"report": 6, "models": {"alpha": {"state": "loaded"}}}  # loaded again
    r1, _ = asyncio.run(directory.statuses())
    assert r1.held == ["alpha"] and r1.report == 6


def test_probes_and_listings_share_one_snapshot_a_second(router, monkeypatch):
    worker = FakeWorker({"r1": {}, "r2": {}})
    directory = ReplicaDirectory(worker)
    reads = []
    monkeypatch.setattr(replicas_module, "_status", lambda *a: reads.append(a) or a)
    monkeypatch.setattr(replicas_module, "FRESH_S", 3600.0)  # one look, however slowly the twenty calls run

    async def many():
        for _ in range(20):
            await directory.statuses()

    asyncio.run(many())
    assert len(reads) == 2 and worker.asked == ["r2"]  # one look: two replicas, once (r2, not polled yet, asked)
    asyncio.run(directory.statuses(fresh=True))
    assert len(reads) == 4 and worker.asked == ["r2", "r1", "r2"]
    monkeypatch.setattr(replicas_module, "FRESH_S", 0.0)
    asyncio.run(directory.statuses())
    assert len(reads) == 6


def test_while_no_worker_replica_answers_yet_the_listing_has_no_replicas_instead_of_an_error(monkeypatch):
    """Right after start-up the ingress answers before any worker replica runs, and this process has no
    worker router yet (a handle makes it at its first call, which waits for a replica): GET /models lists
    the registry with no replicas, instead of failing with the call's timeout (seen: a 500)."""

    class StartingWorker:
        app_name, deployment_name = "starting-app", "ModelWorker"

        @property
        def status(self):
            class _Method:
                async def remote(self, on_replica=None):
                    await asyncio.sleep(3600)  # no replica runs yet

            return _Method()

    monkeypatch.setattr(replicas_module, "ASK_TIMEOUT_S", 0.05)
    assert asyncio.run(ReplicaDirectory(StartingWorker()).statuses()) == []


def test_while_serves_status_cannot_be_read_readiness_counts_no_replica_and_no_rollout_is_known_done(monkeypatch):
    """Serve's controller restarting: ``serve.status()`` raises (or hangs). The readiness probe counts no
    running worker replica (a 503, not a 500 with a traceback each probe), and the listing does not claim
    that every replica runs its registry."""

    def unreachable():
        raise ConnectionError("the controller is restarting")

    monkeypatch.setattr(replicas_module.serve, "status", unreachable)
    directory = ReplicaDirectory(FakeWorker({}), ingress="Ingress")

    async def scenario():
        return await directory.running_count(), await directory.ingress_updating()

    assert asyncio.run(scenario()) == (0, True)


def test_a_call_to_a_replica_by_name_ends_when_that_replica_has_stopped_and_not_while_it_updates(router, monkeypatch):
    """The router sends a call pinned to a replica there and nowhere else; once that replica has died, nothing
    would answer until the call's timeout (an unload: 60 s). It ends with ReplicaGone once the replica is out
    of the router's set and Serve's controller no longer lists it running; out of the set while it applies a
    registry change (the controller lists it UPDATING), the call waits on."""
    monkeypatch.setattr(replicas_module, "GONE_CHECK_S", 0.01)
    listed = [{"replica_id": "r1", "state": "UPDATING"}, {"replica_id": "r2", "state": "RUNNING"}]
    details = {"applications": {"app": {"deployments": {"ModelWorker": {"replicas": listed}}}}}
    monkeypatch.setattr(replicas_module.ray_internals, "serve_instance_details", lambda: details)

    class Silent:
        app_name, deployment_name = "app", "ModelWorker"

        def options(self, **_):
            return self

        @property
        def unload(self):
            class _Method:
                async def remote(self, on_replica=None):
                    await asyncio.sleep(3600)  # the dead replica never answers

            return _Method()

    directory = ReplicaDirectory(Silent())

    async def scenario():
        call = asyncio.ensure_future(directory.unload("alpha", "r1", timeout_s=3600))
        await asyncio.sleep(0.05)
        assert not call.done()  # r1 still running: the call waits
        router.replicas = [r for r in router.replicas if r.replica_id.unique_id != "r1"]  # r1 updates
        await asyncio.sleep(0.1)
        assert not call.done()  # still running, by the controller: the call waits
        del listed[0]  # r1 died: the controller no longer lists it
        with pytest.raises(replicas_module.ReplicaGone):
            await asyncio.wait_for(call, 5)

    asyncio.run(scenario())
