"""The model workers' router (deployments/routing/router.py) between the replicas' reports: what it has
just sent and carried counts before the replicas' pushed model ids show it.

Every ranking goes through the router's public ``choose_replicas``, as Serve asks it; the tests at the end
run requests through Serve's own routing loop (``RequestRouter``'s, unpatched: its queue probes, its
back-off and its FIFO matching), on replicas that answer its probes, as a full pool at saturation does."""

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from ray.serve.request_router import PendingRequest

from deployments.routing.router import OWN_REPLICA_WAIT_S, ModelAwareRouter
from serve_app.core.config import RoutingArgs
from serve_app.core.schemas import ON_REPLICA, WorkerCall
from tests.helpers import until

UNLOAD = WorkerCall.UNLOAD.value


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass
class FakeReplica:
    """What the router reads of a RunningReplica: its id, the model ids it pushed, its reported stats."""

    name: str
    multiplexed_model_ids: set[str] = field(default_factory=set)
    routing_stats: dict = field(default_factory=dict)
    node_id: str = "node-1"

    @property
    def replica_id(self) -> FakeId:
        return FakeId(self.name)


@pytest.fixture
def router():
    r = ModelAwareRouter(
        SimpleNamespace(name="ModelWorker", app_name="router-test"), handle_source=SimpleNamespace(value="test")
    )
    r.initialize_state()
    return r


def routing_context():
    """A new PendingRequest's routing context (Serve's, where its router records its attempts)."""
    (field,) = [f for f in dataclasses.fields(PendingRequest) if f.name == "routing_context"]
    return field.default_factory()


def request(model_id: str, method: str = "__call__", **kwargs) -> SimpleNamespace:
    """What the router reads of a PendingRequest: the method called, its model id, its keyword arguments,
    when it reached the router (now), and the routing context it tells Serve to back off in."""
    return SimpleNamespace(
        kwargs=kwargs,
        metadata=SimpleNamespace(call_method=method, multiplexed_model_id=model_id),
        created_at=time.time(),
        routing_context=routing_context(),
    )


class Failures(logging.Handler):
    """The errors the router logs (its fallback when ranking fails) while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def routed(router, replicas, pending) -> list[str]:
    """The replicas ``choose_replicas`` ranks for the request, one per group, best first (its ranking, not
    the fallback to every candidate that a failure takes)."""
    failures = Failures()
    logging.getLogger("ray.serve").addHandler(failures)
    try:
        groups = asyncio.run(router.choose_replicas(replicas, pending))
    finally:
        logging.getLogger("ray.serve").removeHandler(failures)
    assert not failures.records, [r.getMessage() for r in failures.records]
    assert all(len(group) == 1 for group in groups), groups
    return [group[0].name for group in groups]


def test_the_routing_knobs_of_the_config_are_the_routers_arguments():
    """serve_app/app.py passes worker.routing, but for stats_period_s (Serve's own), as the router's kwargs."""
    knobs = RoutingArgs(spread_at=6, affinity_half_life_s=7.0).model_dump(exclude={"stats_period_s"})
    r = ModelAwareRouter(
        SimpleNamespace(name="ModelWorker", app_name="router-knobs"), handle_source=SimpleNamespace(value="test")
    )
    r.initialize_state(**knobs)
    assert r._knobs.spread_at == 6
    r._recent_all.add("a", 0.0)
    assert r._recent_all.demand("a", 7.0) == pytest.approx(0.5)


def test_misses_into_an_idle_pool_spread_over_its_replicas_before_any_push_shows_them(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    assert routed(router, [a, b], request("m1"))[0] == "a"
    assert routed(router, [a, b], request("m2"))[0] == "b"  # a holds m1, as far as this router knows


def test_an_unload_it_carried_frees_the_slot_before_the_replica_pushes_its_model_ids(router, send):
    """The pushed ids still name the unloaded model on both replicas: a request for it is a miss, and a
    request for another model takes a free slot on the first replica, not a stale copy's neighbour. An
    unload counts once it is sent: one ranked and never sent (its caller gave up) changes nothing."""
    a, b = FakeReplica("a", {"beta"}), FakeReplica("b", {"beta"})
    for replica in (a, b):
        unload = request("beta", UNLOAD, **{ON_REPLICA: replica.name})
        assert routed(router, [a, b], unload) == [replica.name]
        assert router._view(replica, time.time()).copy_of("beta") is not None  # ranked, not sent yet
        send(replica, "beta", f"unload-{replica.name}", unload)
        router.on_request_completed(replica.replica_id, f"unload-{replica.name}")
    assert routed(router, [a, b], request("alpha"))[0] == "a"
    assert routed(router, [a, b], request("beta"))[0] == "b"  # a miss now: the emptier replica


def test_a_call_for_one_replica_goes_there_or_nowhere(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    assert routed(router, [a, b], request("m", "status", **{ON_REPLICA: "b"})) == ["b"]
    assert routed(router, [a], request("m", "status", **{ON_REPLICA: "b"})) == []


def test_a_hit_goes_to_the_holder_with_fewer_requests_sent_and_not_completed(router):
    a, b = FakeReplica("a", {"m"}), FakeReplica("b", {"m"})
    for _ in range(3):
        router.on_send_request(a.replica_id)
    router.on_send_request(b.replica_id)
    assert routed(router, [a, b], request("m"))[0] == "b"
    for i in range(3):
        router.on_request_completed(a.replica_id, f"done-{i}")
    assert routed(router, [a, b], request("m"))[0] == "a"


@pytest.fixture
def send(router, monkeypatch):
    """Serve's sending of a request to a replica the test names, for the router's bookkeeping: the base
    router hands that replica to ``_choose_replica_for_request`` (whatever the ranking: the tests through
    Serve's own loop are at the end), then Serve counts the send (``on_send_request``). ``send.many`` sends
    several in one event loop."""
    from ray.serve.request_router import RequestRouter

    chosen = {}

    async def base_choice(self, pending_request, *, is_retry=False):
        return chosen["replica"]

    monkeypatch.setattr(RequestRouter, "_choose_replica_for_request", base_choice)

    async def one(replica, model_id: str, request_id: str, pending=None) -> None:
        chosen["replica"] = replica
        pending = pending or request(model_id)
        pending.metadata.internal_request_id = request_id
        assert await router._choose_replica_for_request(pending) is replica
        router.on_send_request(replica.replica_id)

    async def many(sends) -> None:
        for args in sends:
            await one(*args)

    def sent(replica, model_id: str, request_id: str, pending=None) -> None:
        """``pending``: the request sent (its method and arguments), else a request for ``model_id``."""
        asyncio.run(one(replica, model_id, request_id, pending))

    sent.many = lambda sends: asyncio.run(many(sends))
    return sent


def test_a_hit_goes_to_the_holder_that_runs_the_same_model(router, send):
    """Both replicas hold both models and are as busy; a served m last. Each model's requests go where
    that model runs, not to the holder that served it last."""
    a, b = FakeReplica("a", {"m", "n"}), FakeReplica("b", {"m", "n"})
    for i in range(3):
        send(a, "n", f"n-{i}")
        send(b, "m", f"m-{i}")
    send(a, "m", "m-a")
    router.on_request_completed(a.replica_id, "m-a")
    router.on_request_completed(a.replica_id, "n-0")
    send(a, "n", "n-3")
    assert routed(router, [a, b], request("m"))[0] == "b"
    assert routed(router, [a, b], request("n"))[0] == "a"


def test_a_hit_goes_to_the_holder_that_has_been_serving_the_model_even_with_nothing_in_flight(router, send):
    """Both replicas hold both models; a has served n lately, b m, and both have answered everything
    (a replica's batch answers its requests together). Each model's next request goes where it has run."""
    a, b = FakeReplica("a", {"m", "n"}), FakeReplica("b", {"m", "n"})
    for i in range(4):
        send(a, "n", f"n-{i}")
        send(b, "m", f"m-{i}")
    send(a, "m", "m-a")
    for replica, ids in ((a, ["n-0", "n-1", "n-2", "n-3", "m-a"]), (b, ["m-0", "m-1", "m-2", "m-3"])):
        for request_id in ids:
            router.on_request_completed(replica.replica_id, request_id)
    assert routed(router, [a, b], request("m"))[0] == "b"
    assert routed(router, [a, b], request("n"))[0] == "a"


def test_a_hit_that_has_waited_is_ranked_to_the_holders_busy_with_other_models_too(router, send):
    """a runs m, b runs n: a fresh request for m is ranked to a alone; one that has waited
    OWN_REPLICA_WAIT_S (a stuck or full a) gets b after a."""
    a, b = FakeReplica("a", {"m", "n"}), FakeReplica("b", {"m", "n"})
    for i in range(4):
        send(a, "m", f"m-{i}")
        send(b, "n", f"n-{i}")
    fresh, waited = request("m"), request("m")
    waited.created_at -= OWN_REPLICA_WAIT_S + 0.1
    assert routed(router, [a, b], fresh) == ["a"]
    assert routed(router, [a, b], waited) == ["a", "b"]


def test_each_call_sent_counts_on_its_replica_until_that_replica_completes_it(router, send):
    """Calls made for one ingress request share its id; a call a full replica rejected completes there
    too, and is sent again elsewhere under the same id."""
    a, b = FakeReplica("a", {"m"}), FakeReplica("b", {"m"})
    send(a, "m", "r1")
    send(a, "m", "r1")
    send(b, "m", "r1")  # after a rejection at b...
    router.on_request_completed(b.replica_id, "r1")  # ...which completes
    assert router._view(a, 0.0).copy_of("m").in_flight == 2
    assert router._view(b, 0.0).copy_of("m").in_flight == 0
    router.on_request_completed(a.replica_id, "r1")
    router.on_request_completed(a.replica_id, "r1")
    assert router._view(a, 0.0).copy_of("m").in_flight == 0
    assert router._running == {}


def test_a_call_for_one_replica_is_no_load_on_it(router, send, monkeypatch):
    """GET /models asks the replicas for their status (a call for one replica): that is no load, and must not
    move a request's placement (the least loaded) nor take a lone request's idle threads."""
    from ray.serve.request_router import RequestRouter

    a = FakeReplica("a", {"m"})
    monkeypatch.setattr(RequestRouter, "_choose_replica_for_request", lambda self, pending, is_retry=False: _ready(a))
    status = request("m", "status", **{ON_REPLICA: "a"})
    status.metadata.internal_request_id = "listing"
    asyncio.run(router._choose_replica_for_request(status))
    router.on_send_request(a.replica_id)
    assert router._sent.get("a", 0) == 0
    send(a, "m", "r1")  # a model call on a counts
    assert router._sent["a"] == 1
    router.on_request_completed(a.replica_id, "listing")  # the status's completion takes nothing off
    assert router._sent["a"] == 1 and not router._uncounted
    router.on_request_completed(a.replica_id, "r1")
    assert router._sent["a"] == 0


async def _ready(value):
    return value


@pytest.fixture
def clock(monkeypatch):
    """The router's clock, which the test moves (Serve's own keeps the real time)."""
    from deployments.routing import router as module

    now = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: now.now))
    return now


@pytest.fixture
def routing_set(router, clock, monkeypatch):
    """Serve's updates of the routing set, on the fake replicas, and a clock the test moves."""
    from ray.serve.request_router import RequestRouter

    monkeypatch.setattr(
        RequestRouter,
        "update_replicas",
        lambda self, replicas: setattr(self, "_replicas", {r.replica_id: r for r in replicas}),
    )
    return clock


def test_a_request_waits_for_the_holder_that_left_the_routing_set_then_it_is_a_miss(router, routing_set):
    """Serve takes a replica out of the routing set while it applies a registry change: a request for a
    model only it holds gets no replica (Serve backs off and asks again) rather than load a copy elsewhere;
    a request for another model is routed as usual; after holder_grace_s the model is a miss like any other."""
    a, b = FakeReplica("a", {"m"}), FakeReplica("b", {"n"})
    router.update_replicas([a, b])
    router.update_replicas([b])  # a is updating
    assert routed(router, [b], request("m")) == []
    assert routed(router, [b], request("n")) == ["b"]
    routing_set.now += 1.0
    router.update_replicas([a, b])  # a is back, holding m
    assert routed(router, [a, b], request("m"))[0] == "a"
    router.update_replicas([b])
    routing_set.now += 3.0  # holder_grace_s
    assert routed(router, [b], request("m")) == ["b"]


def test_a_replica_whose_report_cannot_be_read_still_leaves_the_routing_set(router, routing_set):
    a = FakeReplica("a", {"m"}, {"models": {"m": {"state": "no such state"}}})
    b = FakeReplica("b", {"n"})
    router.update_replicas([a, b])
    router.update_replicas([b])  # Serve's update runs: a is no candidate, its pushed model awaited a while
    assert [r.name for r in router.replicas] == ["b"] and router._away["a"][1] == {"m"}


def test_a_request_does_not_wait_for_a_holder_whose_actor_died(router, routing_set):
    a, b = FakeReplica("a", {"m"}), FakeReplica("b")
    router.update_replicas([a, b])
    router.update_replicas([b])
    router.on_replica_actor_died(a.replica_id)
    assert routed(router, [b], request("m")) == ["b"]


def test_its_own_misses_stand_against_model_ids_pushed_before_them(router, routing_set):
    """The ids a replica pushes lag behind the misses this router places there: ids pushed before two misses
    still name the model the first one evicted and lack the one it loaded. Until load_grace_s the view
    follows the router's own placements, so the second miss evicts the right model and the replica shows
    the two models it holds, not three."""
    a = FakeReplica("a", {"c0", "c4"})  # pushed before the misses below, and not again until the end
    router._last_used[("a", "c4")] = routing_set.now - 2  # a's least recently used
    router._last_used[("a", "c0")] = routing_set.now - 1
    assert routed(router, [a], request("c5")) == ["a"]  # a miss: Ray's LRU evicts c4
    routing_set.now += 0.1
    router._sending("r1", "a", "c5")
    routing_set.now += 0.1
    router._sending("r2", "a", "c0")  # a hit: c5 is a's least recently used now
    routing_set.now += 0.1
    assert routed(router, [a], request("c3")) == ["a"]  # a miss: Ray's LRU evicts c5
    routing_set.now += 0.1
    assert {c.model_id for c in router._view(a, routing_set.now).copies} == {"c0", "c3"}
    routing_set.now += router._load_grace_s
    a.multiplexed_model_ids = {"c0", "c3"}  # the replica's pushed ids catch up
    assert {c.model_id for c in router._view(a, routing_set.now).copies} == {"c0", "c3"}


def test_a_replica_never_shows_more_models_than_it_holds(router):
    """Another ingress's router loaded a model on a replica where this one had just placed one: of the three
    models the merged view names, the least recently used is the one Ray's LRU evicted."""
    a = FakeReplica("a", {"used"}, {"models": {"used": {"last_used_at": 2.0}}})
    assert routed(router, [a], request("newer")) == ["a"]  # a free slot, as far as this router knows
    a.multiplexed_model_ids = {"used", "other"}  # pushed after the other router's miss there
    a.routing_stats = {"models": {"used": {"last_used_at": 2.0}, "other": {"last_used_at": 2.5}}}
    assert {c.model_id for c in router._view(a, time.time()).copies} == {"other", "newer"}


def test_a_model_it_placed_again_stays_in_view_while_the_pushed_ids_catch_up(router, routing_set):
    """A replica's pushed ids still name a model from its earlier stay there when this router places it there
    again; the ids it pushed in between, which lack it, must not take it out of the view."""
    a = FakeReplica("a", {"m", "x"})
    router._last_used.update({("a", "m"): routing_set.now - 2, ("a", "x"): routing_set.now - 1})
    assert routed(router, [a], request("y")) == ["a"]  # a miss: Ray's LRU evicts m
    routing_set.now += 0.1
    router._sending("r1", "a", "y")
    assert routed(router, [a], request("m")) == ["a"]  # a miss: x goes, m comes back
    routing_set.now += 0.1
    router._sending("r2", "a", "m")
    assert routed(router, [a], request("m")) == ["a"]  # a hit, while the ids still read as before
    a.multiplexed_model_ids = {"x", "y"}  # the ids the replica pushed between the two misses arrive
    assert {c.model_id for c in router._view(a, routing_set.now).copies} == {"y", "m"}


# -- bytes --------------------------------------------------------------------------------------------

MB = 1 << 20


def report(budget: int | None, **sizes: int) -> dict:
    """A replica's report (record_routing_stats) with its memory budget and the measured size of each model."""
    return {
        "slots": 2,
        "memory": {"budget_bytes": budget, "used_bytes": sum(sizes.values())},
        "models": {m: {"state": "loaded", "size_bytes": size, "last_used_at": 1.0} for m, size in sizes.items()},
    }


def test_a_miss_names_the_victims_it_chose_and_the_size_it_knows_to_the_replica_it_goes_to(router):
    """The replicas' reports teach the router each model's size and each replica's budget; a miss goes where
    the new copy evicts the least worth, and its hint names those victims (Ray's LRU would take the least
    recently used) and the size, which the registry declared before any replica measured it."""
    from serve_app.core.schemas import ROUTE

    a = FakeReplica("a", {"large", "small"}, report(500 * MB, large=300 * MB, small=100 * MB))
    b = FakeReplica("b", {"busy", "busy2"}, report(500 * MB, busy=250 * MB, busy2=200 * MB))
    for _ in range(20):  # demand for the busy models
        router._demand.add("busy", time.time())
        router._demand.add("busy2", time.time())
        router._demand.add("small", time.time())
    pending = request("new", "predict", declared_bytes=150 * MB)
    assert routed(router, [a, b], pending)[0] == "a"
    hint = pending.kwargs[ROUTE]
    assert (hint.replica_id, hint.evict, hint.size_bytes) == ("a", ("large",), 150 * MB)
    assert "large" not in {c.model_id for c in router._view(a, time.time()).copies}  # gone, as far as it knows


def test_a_model_larger_than_every_budget_is_still_routed_for_the_replica_to_refuse(router):
    a = FakeReplica("a", set(), report(100 * MB))
    pending = request("huge", "predict", declared_bytes=400 * MB)
    assert routed(router, [a], pending) == ["a"]


def test_a_status_call_gets_no_hint(router):
    from serve_app.core.schemas import ROUTE

    pending = request("m", "status", **{ON_REPLICA: "a"})
    routed(router, [FakeReplica("a")], pending)
    assert ROUTE not in pending.kwargs


# -- idle cores for a lone request ----------------------------------------------------------------------


def sent(router, replica, pending, request_id: str = "r") -> None:
    """``pending`` sent to ``replica`` as Serve sends it: the router's last step, then Serve's count of it."""
    from ray.serve.request_router import RequestRouter

    pending.metadata.internal_request_id = request_id
    original = RequestRouter._choose_replica_for_request
    RequestRouter._choose_replica_for_request = lambda self, pending, is_retry=False: _ready(replica)
    try:
        assert asyncio.run(router._choose_replica_for_request(pending)) is replica
    finally:
        RequestRouter._choose_replica_for_request = original
    router.on_send_request(replica.replica_id)


def test_a_request_alone_on_an_idle_node_may_use_the_threads_of_its_replicas(router, routing_set):
    """The router knows every replica's requests in flight: when none of the chosen replica's node is busy, a
    request may run on their threads together (each replica reports its own share); under load, or alone on
    its node, it keeps its replica's share."""
    from serve_app.core.schemas import ROUTE

    a = FakeReplica("a", {"m"}, {"threads": 1, "models": {}})
    b = FakeReplica("b", {"x"}, {"threads": 2, "models": {}})
    far = FakeReplica("c", {"y"}, {"threads": 1, "models": {}}, node_id="node-2")
    router.update_replicas([a, b, far])

    def threads(*replicas):
        """The threads of the hint the request is sent with, to the replica ranked first."""
        pending = request("m", "predict")
        first = routed(router, list(replicas), pending)[0]
        assert pending.kwargs[ROUTE].threads is None  # known once it is sent
        sent(router, next(r for r in replicas if r.name == first), pending)
        router.on_request_completed(FakeId(first), "r")
        return pending.kwargs[ROUTE].threads

    assert threads(a, b, far) == 3  # a and b share node-1: 1 + 2 threads, both idle
    router.on_send_request(b.replica_id)  # b runs a request
    assert threads(a, b, far) is None
    router.on_request_completed(b.replica_id, "r1")
    assert threads(a, b, far) == 3
    router.update_replicas([a, far])  # a alone on its node: no idle neighbour
    assert threads(a, far) is None


# -- choose_replicas, Serve's entry point ---------------------------------------------------------------


def test_every_answer_asks_serve_to_back_off_since_its_groups_cover_every_candidate(router):
    a, b = FakeReplica("a", {"m"}), FakeReplica("b")
    for pending in (request("m"), request("new")):  # a hit, a miss
        assert asyncio.run(router.choose_replicas([a, b], pending))
        assert pending.routing_context.should_backoff is True


def test_a_ranking_that_fails_falls_back_to_every_candidate_instead_of_hanging_the_request(router):
    """An exception out of choose_replicas would hang the request in Serve's routing loop: a replica whose
    report the router cannot read makes the ranking fail, and every candidate comes back, in one group."""
    a, b = FakeReplica("a", {"m"}, {"models": {"m": {"state": "no such state"}}}), FakeReplica("b")
    failures = Failures()
    logging.getLogger("ray.serve").addHandler(failures)
    pending = request("m")
    try:
        groups = asyncio.run(router.choose_replicas([a, b], pending))
    finally:
        logging.getLogger("ray.serve").removeHandler(failures)
    assert groups == [[a, b]] and pending.routing_context.should_backoff is True
    assert [r.getMessage() for r in failures.records] == ["model-aware routing failed; routing to any replica"]


def test_its_bookkeeping_of_requests_sent_stays_bounded_to_the_replicas_that_run(router, send, routing_set):
    """Requests sent to replicas that are gone (and never completed there) are forgotten once the router's
    records pass 4096 entries; what it knows of the replicas that run stays."""
    a = FakeReplica("a", {"m"})
    router.update_replicas([a])
    send(a, "m", "on-a")  # running on a
    # each on a replica that left the routing set since, and never completed
    send.many((FakeReplica(f"gone-{i}", {"m"}), "m", f"gone-{i}") for i in range(4096))
    # Pruned as the last one was recorded (Serve counts its send just after)
    assert len(router._running) == 1 and set(router._last_used) == {("a", "m")} and len(router._sent) == 2
    assert router._view(a, routing_set.now).copy_of("m").in_flight == 1 and router._sent["a"] == 1  # a's counts
    router.on_request_completed(a.replica_id, "on-a")
    assert router._running == {} and router._sent["a"] == 0


# -- through Serve's routing loop ------------------------------------------------------------------------


@dataclass
class ServedReplica(FakeReplica):
    """A replica as Serve's routing loop sees it too: what it answers its queue probes (``queue``, the
    requests it runs), and how many it takes at once."""

    max_ongoing_requests: int = 2
    queue: int = 0
    probes: int = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        return self.queue


class Serve:
    """Serve's side of the router, unpatched: requests go through ``RequestRouter``'s routing loop (its
    queue probes and back-off, one routing task at a time), and each request the loop places is sent as
    Serve sends it: counted on the replica (its queue) and by the router (``on_send_request``)."""

    def __init__(self, router, replicas: list[ServedReplica], routing_tasks: int = 1) -> None:
        self.router, self.replicas = router, replicas
        router.max_num_routing_tasks_cap = routing_tasks  # 1: one request placed at a time
        router.update_replicas(replicas)
        self.ids = iter(range(1_000_000))

    def submit(self, model_id: str, created_at: float | None = None, method: str = "predict", **kwargs) -> asyncio.Task:
        """A call of ``method`` (with ``kwargs``) for ``model_id``, sent once the loop has placed it; the
        task's result is its replica."""
        n = next(self.ids)
        metadata = SimpleNamespace(  # what Serve reads of a request's metadata
            request_id=f"r{n}", internal_request_id=f"r{n}", call_method=method, multiplexed_model_id=model_id
        )
        pending = PendingRequest(args=[], kwargs=kwargs, metadata=metadata)
        if created_at is not None:
            pending.created_at = created_at

        async def send() -> tuple[ServedReplica, str]:
            replica = await self.router._choose_replica_for_request(pending)
            replica.queue += 1  # Serve sends it: the replica runs it, the router counts it
            self.router.on_send_request(replica.replica_id)
            return replica, metadata.internal_request_id

        task = asyncio.ensure_future(send())
        task.pending = pending  # what it was sent with: its hint (ROUTE)
        return task

    async def place(self, model_id: str) -> tuple[ServedReplica, str]:
        return await asyncio.wait_for(self.submit(model_id), 30)

    def complete(self, replica: ServedReplica, request_id: str) -> None:
        replica.queue -= 1
        self.router.on_request_completed(replica.replica_id, request_id)

    async def probed(self, replica: ServedReplica, times: int) -> None:
        """Until Serve's loop has probed ``replica`` ``times`` more times: it has tried and backed off again."""
        target = replica.probes + times
        await until(lambda: replica.probes >= target, timeout_s=30.0, interval_s=0.001)


async def saturated(
    router, routing_tasks: int = 1
) -> tuple[Serve, ServedReplica, ServedReplica, list[tuple[ServedReplica, str]]]:
    """Two replicas that hold m and n, placed through Serve's loop: a runs two requests for m, b two for n.
    Every replica has max_ongoing_requests (2) in flight."""
    a, b = ServedReplica("a", {"m", "n"}), ServedReplica("b", {"m", "n"})
    serve = Serve(router, [a, b], routing_tasks)
    running = [await serve.place(model) for model in ("m", "n", "m", "n")]
    return serve, a, b, running


def test_at_saturation_a_request_waits_for_its_models_replica_up_to_the_bound_and_none_is_dropped(clock):
    """Every replica is full. Three requests for m wait in Serve's loop for a, which runs m, and not for b,
    which runs n, though b frees first: while they have waited less than OWN_REPLICA_WAIT_S, b is not even
    probed. The first goes to a when a slot frees there; once the others have waited OWN_REPLICA_WAIT_S, b
    follows a in their ranking, and they go to b. Each of the three is placed, once. (The router the builder
    configures by default.)"""
    router = built_router()

    async def scenario():
        serve, a, b, running = await saturated(router)
        assert [(r.name, r.queue) for r in (a, b)] == [("a", 2), ("b", 2)]
        assert [replica.name for replica, _ in running] == ["a", "b", "a", "b"]
        waiting = [serve.submit("m", created_at=clock.now) for _ in range(3)]
        await serve.probed(a, 2)  # tried a, which is full, and tried again
        for replica, request_id in running:
            if replica is b:
                serve.complete(replica, request_id)  # b is free now
        b_probes = b.probes
        await serve.probed(a, 3)
        assert not any(w.done() for w in waiting) and b.probes == b_probes  # they wait for a, not for b
        serve.complete(*running[0])  # a slot frees on a
        first = await asyncio.wait_for(waiting[0], 30)
        assert first[0] is a and not any(w.done() for w in waiting[1:])  # a is full again
        await serve.probed(a, 2)
        clock.now += OWN_REPLICA_WAIT_S  # the other two have waited the bound
        rest = await asyncio.wait_for(asyncio.gather(*waiting[1:]), 30)
        return [first[0].name] + [replica.name for replica, _ in rest]

    assert asyncio.run(scenario()) == ["a", "b", "b"]


@pytest.mark.parametrize("method, model_id", [(WorkerCall.STATUS.value, ""), (UNLOAD, "m")])
def test_a_call_for_one_replica_takes_only_that_replica_and_that_replica_is_not_handed_to_another_request(
    clock, method, model_id
):
    """Serve matches the replica a routing task chose to the oldest waiting request (of the same model, else
    any): a call for one replica (a status, an unload) must still reach that replica, and the replica chosen
    for it must not carry a waiting prediction where the router did not place it. Every replica is full; a
    request for m waits for a, which runs m, and a call for b waits for b. b frees first: the call goes to
    b, and the request for m still waits for a, then goes there."""
    router = built_router()

    async def scenario():
        serve, a, b, running = await saturated(router, routing_tasks=2)
        predict = serve.submit("m", created_at=clock.now)
        await serve.probed(a, 2)
        call = serve.submit(model_id, method=method, **{ON_REPLICA: "b"})
        await serve.probed(b, 2)  # the call waits for b, which is full
        for replica, request_id in running:
            if replica is b:
                serve.complete(replica, request_id)  # b is free now
        called = await asyncio.wait_for(call, 30)
        assert not predict.done()  # still waiting for a
        serve.complete(*running[0])  # a slot frees on a
        return called[0].name, (await asyncio.wait_for(predict, 30))[0].name

    assert asyncio.run(scenario()) == ("b", "a")


def test_two_calls_for_two_replicas_each_reach_their_own_whichever_frees_first(clock):
    """GET /models asks every replica at once, in calls that share the ingress request's id: the call for a
    waits while b frees first, and b goes to the call for b, not to the older call for a."""
    router = built_router()

    async def scenario():
        serve, _, b, running = await saturated(router, routing_tasks=2)
        for_a = serve.submit("", method=WorkerCall.STATUS.value, **{ON_REPLICA: "a"})
        for_b = serve.submit("", method=WorkerCall.STATUS.value, **{ON_REPLICA: "b"})
        await serve.probed(b, 2)
        serve.complete(*running[1])  # one of b's requests: b is free now
        got_b = await asyncio.wait_for(for_b, 30)
        assert not for_a.done()
        serve.complete(*running[0])
        return (await asyncio.wait_for(for_a, 30))[0].name, got_b[0].name

    assert asyncio.run(scenario()) == ("a", "b")


def test_a_miss_that_waits_for_its_replica_is_sent_with_the_victims_its_placement_chose(clock):
    """A miss placed on a full replica is ranked again at each of Serve's tries, and by then the router's
    own placement shows the model there: it is still sent with the victims the placement chose (the
    replica's LRU would take the least recent copy instead)."""
    from serve_app.core.schemas import ROUTE

    router = built_router()

    async def scenario():
        a = ServedReplica("a", {"big", "small"}, report(500 * MB, big=300 * MB, small=100 * MB))
        serve = Serve(router, [a])
        running = [await serve.place("small") for _ in range(2)]  # a is full
        task = serve.submit("new", declared_bytes=150 * MB)
        await serve.probed(a, 3)  # ranked again on each try
        serve.complete(*running[0])
        replica, _ = await asyncio.wait_for(task, 30)
        return replica.name, task.pending.kwargs[ROUTE].evict

    assert asyncio.run(scenario()) == ("a", ("big",))


def test_a_miss_serve_sends_to_a_later_groups_replica_is_placed_there_and_not_where_it_was_ranked():
    """Both replicas are full; a miss for x is ranked to a (its copy p evicted there, as far as the router
    knows), and b frees first: x goes to b. The router then shows x on b, and a as it is, p included, so
    that the next request for x goes to b, and one for p to a."""
    router = built_router()

    async def scenario():
        a, b = ServedReplica("a", {"m", "p"}), ServedReplica("b", {"n", "q"})
        serve = Serve(router, [a, b])
        running = [await serve.place(model) for model in ("m", "n", "m", "n")]
        assert [replica.name for replica, _ in running] == ["a", "b", "a", "b"]  # both full
        task = serve.submit("x")
        await serve.probed(a, 2)
        serve.complete(*running[1])  # b frees first
        replica, _ = await asyncio.wait_for(task, 30)
        now = time.time()
        return replica.name, {r.name: {c.model_id for c in router._view(r, now).copies} for r in (a, b)}

    name, views = asyncio.run(scenario())
    assert name == "b" and views["a"] == {"m", "p"} and "x" in views["b"]


def test_two_requests_ranked_together_on_an_idle_node_do_not_both_take_its_threads(clock):
    """The idle threads are counted as a request is sent, after every request sent before it: of two
    requests that reach an idle node together (both ranked before either is sent), one may run on the
    node's threads, not both."""
    from serve_app.core.schemas import ROUTE

    router = built_router()

    async def scenario():
        a = ServedReplica("a", {"m"}, {"threads": 1, "models": {}})
        b = ServedReplica("b", {"n"}, {"threads": 1, "models": {}})
        serve = Serve(router, [a, b], routing_tasks=2)
        tasks = [serve.submit("m"), serve.submit("n")]
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return [t.pending.kwargs[ROUTE].threads for t in tasks]

    assert asyncio.run(scenario()) == [2, None]


@pytest.mark.parametrize("method", [WorkerCall.PREDICT.value, UNLOAD])
def test_a_call_that_waits_and_is_never_sent_changes_nothing_the_router_knows(clock, method):
    """A miss for x ranked to a full replica a (p evicted there), or an unload of m from a, whose caller gives
    up before it is sent (a timeout, a client gone): a still holds m and p as far as the router knows."""
    router = built_router()

    async def scenario():
        serve, a, b, _ = await saturated(router)
        a.multiplexed_model_ids, b.multiplexed_model_ids = {"m", "p"}, {"n", "q"}
        if method == UNLOAD:
            task = serve.submit("m", method=UNLOAD, **{ON_REPLICA: "a"})
        else:
            task = serve.submit("x", method=method)
        await serve.probed(a, 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return {c.model_id for c in router._view(a, clock.now).copies}  # the router's clock

    assert asyncio.run(scenario()) == {"m", "p"}


def built_router(**routing) -> ModelAwareRouter:
    """The worker deployment's router as Serve makes it from the app the builder binds with these
    ``worker.routing`` args: its class and keyword arguments, from the deployment's request-router config."""
    import importlib

    from serve_app.core.config import AppArgs
    from tests.helpers import built_on_the_loopback

    ingress = built_on_the_loopback(AppArgs(auth={"mode": "off"}, worker={"routing": routing}))._bound_deployment
    (worker,) = [
        a._bound_deployment
        for a in ingress.init_args
        if hasattr(a, "_bound_deployment") and a._bound_deployment.name == "ModelWorker"
    ]
    config = worker._deployment_config.request_router_config
    module, _, name = config.request_router_class.partition(":")
    r = getattr(importlib.import_module(module), name)(
        SimpleNamespace(name="ModelWorker", app_name="built"), handle_source=SimpleNamespace(value="test")
    )
    r.initialize_state(**config.request_router_kwargs)
    return r


def test_with_ray_default_a_request_at_saturation_takes_the_first_free_holder_whatever_it_runs(clock):
    """The comparison (worker.routing.policy: ray_default, Ray Serve's own multiplexed routing, in the router
    the builder configures, through the same loop): the request for m goes to b as soon as b frees, beside
    n's requests."""
    router = built_router(policy="ray_default")

    async def scenario():
        serve, a, b, running = await saturated(router)
        waiting = serve.submit("m", created_at=clock.now)
        await serve.probed(a, 2)
        assert not waiting.done()
        for replica, request_id in running:
            if replica is b:
                serve.complete(replica, request_id)
        return (await asyncio.wait_for(waiting, 30))[0].name

    assert asyncio.run(scenario()) == "b"


def test_a_request_whose_ranking_fails_is_still_placed(router, clock):
    """Serve's loop with a replica whose report the router cannot read: the request gets a replica."""

    async def scenario():
        a = ServedReplica("a", {"m"}, {"models": {"m": {"state": "no such state"}}})
        serve = Serve(router, [a, ServedReplica("b")])
        return (await serve.place("m"))[0]

    assert asyncio.run(scenario()).name in {"a", "b"}


def test_a_miss_avoids_a_replica_whose_report_shows_a_load_under_way_until_a_call_for_it_completes(router, send):
    """A replica loads one model at a time: its report shows the load (``loading``), and a miss goes to the
    replica that loads nothing, though it must evict there. Once a call for the loading model completes on
    its replica, the load is over, whatever the report says until its next one."""
    slow = report(None, big=0)
    slow["models"]["big"]["state"], slow["at"] = "loading", time.time()
    a = FakeReplica("a", set(), slow)
    b = FakeReplica("b", {"x", "y"}, report(None, x=0, y=0))
    assert router._view(a, time.time()).loading and not router._view(b, time.time()).loading
    assert routed(router, [a, b], request("small", "predict"))[0] == "b"
    send(b, "small", "r0")
    router.on_request_completed(b.replica_id, "r0")  # small's request answered: its load on b is done
    send(a, "big", "r1")
    router.on_request_completed(a.replica_id, "r1")  # big's request answered: its load is done
    assert not router._view(a, time.time()).loading
    assert routed(router, [a, b], request("small2", "predict"))[0] == "a"
    # A miss this router placed is loading from then on, before any report shows it: the next miss goes
    # elsewhere, here where it evicts, until a call for the placed model completes.
    assert router._view(a, time.time()).copy_of("small2").loading
    assert routed(router, [a, b], request("small3", "predict"))[0] == "b"


# -- what the router keeps --------------------------------------------------------------------------------


def test_the_requests_it_placed_leave_serves_index_of_waiting_requests_by_model(clock):
    """Serve indexes each waiting request by its model and clears the answered ones when its matching looks one
    up; the matching here replaces Serve's, and clears them too: else every request, its inputs with it, would
    stay in the ingress for its life."""
    router = built_router()
    a, b = ServedReplica("a", {"m"}), ServedReplica("b", {"n"})

    async def scenario():
        serve = Serve(router, [a, b])
        for i in range(200):
            replica, request_id = await serve.place("m" if i % 2 else "n")
            serve.complete(replica, request_id)

    asyncio.run(scenario())
    assert sum(len(waiting) for waiting in router._pending_requests_by_model_id.values()) == 0


def test_a_miss_placed_where_no_ranking_placed_it_names_no_victims_of_an_expired_placement(router, clock):
    """A miss for m placed on x, naming a victim to evict, expires with its load grace. When Serve later hands
    a request for m to x where its ranking chose another replica, that copy (which x may hold and need again by
    then) is no victim of this placement."""
    from serve_app.core.schemas import ROUTE

    x = FakeReplica("x", {"v", "w"}, report(2 * MB, v=MB, w=MB))
    pending = request("m", "predict", declared_bytes=MB)
    assert routed(router, [x], pending) == ["x"]
    (victim,) = pending.kwargs[ROUTE].evict
    clock.now += router._load_grace_s + 60  # the placement expired; x holds the victim alone now
    x.multiplexed_model_ids, x.routing_stats = {victim}, report(2 * MB, **{victim: MB})
    later = request("m", "predict", declared_bytes=MB)
    hint = router._hint_at_send(later, x)  # no ranking of this request placed it on x
    assert (hint.replica_id, hint.evict) == ("x", ())


def test_a_size_the_old_files_measured_is_forgotten_when_the_replicas_reset_it(router):
    """A registry change of a model's files clears its measured sizes on every replica; the router then goes by
    the size the registry declares, not the old files' (which a worker would refuse as over its budget)."""
    from serve_app.core.schemas import ROUTE

    x = FakeReplica("x", set(), report(300 * MB))
    x.routing_stats["models"]["m"] = {"state": "failed", "size_bytes": 400 * MB, "retry_after": time.time() - 1}
    routed(router, [x], first := request("m", "predict", declared_bytes=400 * MB))
    assert first.kwargs[ROUTE].size_bytes == 400 * MB
    x.routing_stats = {**report(300 * MB), "models": {"m": {"state": "not_loaded"}}}  # after the change
    routed(router, [x], after := request("m", "predict", declared_bytes=100 * MB))
    assert after.kwargs[ROUTE].size_bytes == 100 * MB


@pytest.mark.parametrize("refusal", ["back-off", "over budget"])
def test_a_miss_ranked_to_a_replica_that_refuses_it_at_once_evicts_nothing_there_in_the_routers_view(router, refusal):
    """The replica answers 503 before evicting anything (a model in its load back-off, one larger than its
    budget); its copies stay in the router's view, and a request for one of them is still a hit there."""
    now = time.time()
    models = {"a": {"state": "loaded", "last_used_at": now - 10}, "b": {"state": "loaded", "last_used_at": now - 5}}
    if refusal == "back-off":
        models["c"] = {"state": "failed", "retry_after": now + 30}
    x = FakeReplica("x", {"a", "b"}, {"slots": 2, "memory": {"budget_bytes": 100 * MB}, "models": models})
    y = FakeReplica("y", {"d"}, {"slots": 2, "models": {"d": {"state": "loaded", "last_used_at": now}}})
    size, pool = (MB, [x, y]) if refusal == "back-off" else (400 * MB, [x])  # larger than every budget
    assert routed(router, pool, request("c", "predict", declared_bytes=size))[0] == "x"
    assert {c.model_id for c in router._view(x, time.time()).copies} == {"a", "b"}
    assert routed(router, [x, y], request("a", "predict"))[0] == "x"


def test_a_pool_of_many_live_pairs_is_not_pruned_again_on_every_request(router, send, routing_set, monkeypatch):
    """Past PRUNE_AT records of live replicas and models (64 replicas of 70 models), pruning drops nothing:
    it runs again once the records have doubled, not on every request (each a rebuild of its records)."""
    from deployments.routing import router as module

    monkeypatch.setattr(module, "PRUNE_AT", 8)
    router._prune_at = 8
    replicas = [FakeReplica(f"r{i}", {"m"}) for i in range(12)]
    router.update_replicas(replicas)
    pruned = []
    keep_only = router._recent_all.keep_only
    monkeypatch.setattr(router._recent_all, "keep_only", lambda f: pruned.append(1) or keep_only(f))
    send.many((r, "m", f"{r.name}-{n}") for n in range(3) for r in replicas)  # 36 requests, 12 live pairs
    assert len(router._last_used) == 12 and 1 <= len(pruned) <= 3
