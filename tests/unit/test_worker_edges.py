"""A worker replica's cache and batches at their edges: requests queued behind a failed load, a resident memory
measure that caught other work, Serve's LRU unloading from a thread of its executor, a load short of a copy
while copies are in use, and a model thread that first ran while another one's thread count was raised."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deployments.worker import copies
from deployments.worker.batching import Batcher
from deployments.worker.cache import ModelCache
from serve_app.core.errors import ModelUnavailable
from serve_app.core.schemas import ReplicaCounters
from tests.unit.test_worker import MB, cached, fake_copy, measured_faster, registry, serve_wrapper, sized_cache, spec


def test_requests_queued_behind_a_failed_load_get_its_503_without_loading_it_again():
    """Four requests for a model whose load fails reach the replica together: all pass the back-off check
    before the first load ends, and queue on Serve's cache lock. One load runs; the others get its 503."""
    c, owner, _ = sized_cache(10_000 * MB, a=MB, b=MB)
    c._live.apply(
        registry(
            *[spec(m, runtime="tests.byo_runtimes:Sized", parameters={"size": MB}) for m in "ab"],
            spec("x", runtime="tests.byo_runtimes:FailsToLoad"),
        )
    )

    async def scenario():
        serve_wrapper(owner, c.load)
        for m in "ab":
            (await c.acquire(m)).release()
        return await asyncio.gather(*[c.acquire("x") for _ in range(4)], return_exceptions=True)

    answers = asyncio.run(scenario())
    assert all(isinstance(a, ModelUnavailable) and "license server" in a.message for a in answers)
    assert c.status["x"].load_failures == 1
    assert c._counters.refused_in_backoff == 3


def test_a_resident_memory_growth_over_the_budget_is_measured_again_once_the_back_off_is_over(monkeypatch):
    """Weights of 200 MB, a budget of 300 MB, and a first load during which the process grew by 400 MB (other
    work of the replica): refused, and shown. After the back-off the model is loaded again and measured again,
    not refused for good by the first measure."""
    c, owner, _ = sized_cache(300 * MB, m=200 * MB)
    reads = iter([0, 400 * MB, 0, 10 * MB])
    monkeypatch.setattr(copies, "resident_bytes", lambda: next(reads))

    async def scenario():
        serve_wrapper(owner, c.load)
        with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
            await c.acquire("m")
        assert c.status["m"].size_bytes == 400 * MB  # as GET /models shows it
        with pytest.raises(ModelUnavailable, match="not tried again"):
            await c.acquire("m")
        c.status["m"].retry_after = time.time() - 1  # the back-off is over
        (await c.acquire("m")).release()

    asyncio.run(scenario())
    assert c.status["m"].load_count == 1 and c.status["m"].size_bytes == 200 * MB


def test_weights_larger_than_the_budget_are_refused_before_anything_is_evicted_for_them():
    c, owner, _ = sized_cache(300 * MB, a=MB, big=400 * MB)

    async def scenario():
        w = serve_wrapper(owner, c.load, n=1)  # one model a replica: Serve's LRU makes room for any miss
        with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
            await c.acquire("big")
        (await c.acquire("a")).release()
        c.status["big"].retry_after = None  # the back-off is over: its exact weights still do not fit
        with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
            await c.acquire("big")
        return list(w.models)

    assert asyncio.run(scenario()) == ["a"]
    assert c.status["big"].load_failures == 2


def test_serves_lru_unloads_from_a_thread_of_its_executor_and_the_cache_changes_on_its_event_loop(monkeypatch):
    """Ray's LRU calls an evicted model's ``__del__`` in its executor; what the cache keeps (held models, their
    status, counters) changes on the event loop only, where the replica's report reads it, and before the
    load that made room goes on."""
    c, owner, _ = sized_cache(10_000 * MB, a=MB, b=MB, d=MB)
    where: list[str] = []
    unloaded = ModelCache._unloaded

    def spy(self, *args):
        where.append(threading.current_thread().name)
        return unloaded(self, *args)

    monkeypatch.setattr(ModelCache, "_unloaded", spy)
    load = c.load

    async def load_after_room(model_id):
        if model_id == "d":  # Serve's LRU made room by count just before
            assert "a" not in c.held and c._counters.evicted_by_lru == 1
        return await load(model_id)

    async def scenario():
        serve_wrapper(owner, load_after_room)
        for m in "abd":
            (await c.acquire(m)).release()
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert where == [loop_thread]
    assert c.held == {"b", "d"}


def test_a_load_short_of_a_copy_waits_for_the_copies_evicted_in_use_and_evicts_no_other_in_use():
    """Three copies alive at most: a and b evicted while requests hold them, c held by a request too. A load
    of d waits for a or b to be freed; c, which requests hold as well, stays in Serve's cache."""
    c, owner, _ = sized_cache(10_000 * MB, a=MB, b=MB, c=MB, d=MB)
    c._memory_wait_s = 30  # a free runs gc.collect, which takes a while in a large process

    async def scenario():
        w = serve_wrapper(owner, c.load)
        held = [await c.acquire(m) for m in "abc"]  # Serve's LRU evicted a for c: it lingers
        await c.evict("b")  # lingers too
        load = asyncio.ensure_future(c.acquire("d"))
        await asyncio.sleep(0.05)
        assert not load.done() and "c" in w.models
        held[0].release()  # a is freed: d fits
        (await load).release()
        return w

    w = asyncio.run(scenario())
    assert sorted(w.models) == ["c", "d"]
    assert c._counters.evicted_for_memory == 0


def test_a_load_short_of_a_copy_only_evicts_the_idle_copy_and_counts_it_with_the_lrus_not_for_memory():
    """a and b evicted while requests hold them, c held and idle: a load of d is short of a copy, not of
    bytes. It evicts c at once, as the LRU would, and counts it among the LRU's evictions: the budget had
    room (``evicted_for_memory`` counts evictions for bytes only)."""
    c, owner, _ = sized_cache(10_000 * MB, a=MB, b=MB, c=MB, d=MB)

    async def scenario():
        w = serve_wrapper(owner, c.load)
        held = [await c.acquire(m) for m in "ab"]
        (await c.acquire("c")).release()  # Serve's LRU evicted a for c: it lingers; c idle
        await c.evict("b")  # lingers too
        (await c.acquire("d")).release()
        for copy in held:
            copy.release()
        return w

    w = asyncio.run(scenario())
    assert sorted(w.models) == ["d"]
    assert (c._counters.evicted_by_lru, c._counters.evicted_for_memory) == (2, 0)


def test_a_model_thread_that_first_ran_beside_a_raised_thread_count_runs_on_the_replicas_share():
    """With torch's OpenMP a thread takes the process's default count when it first runs, and a pass on the
    idle threads raises that default while it runs. A new copy's thread that first ran then still runs its
    later batches on the replica's own share."""
    import torch

    torch.set_num_threads(1)
    a, b = fake_copy("a"), fake_copy("b")
    measured_faster(a.idle_threads)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    started = threading.Event()

    def predict_of(name):
        def predict(inputs):
            seen[name].append(torch.get_num_threads())
            if name == "a":
                started.set()
                time.sleep(0.2)
            return [[("x", 1.0)]] * len(inputs)

        return predict

    a.runtime.predict, b.runtime.predict = predict_of("a"), predict_of("b")
    a.thread.submit(torch.get_num_threads).result()  # a's thread has run before, on the replica's share
    batcher = Batcher(ReplicaCounters(), threads=1)
    batcher._cores = 4
    run_batch = Batcher.run_batch.__wrapped__

    async def scenario():
        lone = asyncio.ensure_future(run_batch(batcher, [["x"]], [a], [4]))
        await asyncio.to_thread(started.wait)
        b.thread.submit(lambda: None).result()  # b's thread is born while a runs on 4
        await run_batch(batcher, [["p"], ["q"]], [b, b], [None, None])
        await lone

    try:
        asyncio.run(scenario())
        assert seen == {"a": [4], "b": [1]}
        assert b.thread.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(1)


def test_of_two_models_lone_batches_running_at_once_only_the_first_takes_the_idle_threads():
    """Serve runs a batch split by model as parts at once: a lone request of each model, both offered the
    node's idle threads, would put both passes on all the cores."""
    import torch

    a, b = fake_copy("a"), fake_copy("b")
    for copy in (a, b):
        measured_faster(copy.idle_threads)
    seen: dict[str, int] = {}
    gate = threading.Event()

    def predict_of(name):
        def predict(inputs):
            seen[name] = torch.get_num_threads()
            gate.wait(5)
            return [[("x", 1.0)]] * len(inputs)

        return predict

    a.runtime.predict, b.runtime.predict = predict_of("a"), predict_of("b")
    for copy in (a, b):
        copy.thread.submit(torch.set_num_threads, 1).result()
    batcher = Batcher(ReplicaCounters(), threads=1)
    batcher._cores = 2
    run_batch = Batcher.run_batch.__wrapped__

    async def scenario():
        parts = [asyncio.ensure_future(run_batch(batcher, [["x"]], [c], [2])) for c in (a, b)]
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(*parts)

    asyncio.run(scenario())
    assert seen == {"a": 2, "b": 1}
    assert batcher._counters.extra_thread_batches == 1


def test_a_model_the_app_evicts_is_off_serves_per_model_gauge_as_after_serves_own_lru():
    """``serve_registered_multiplexed_model_id``, Ray's gauge of the models a replica holds, goes to 0 for an
    explicit unload, as it does when Serve's LRU evicts."""
    c, owner = cached()
    serve_cache = getattr(owner, "__serve_multiplex_wrapper")
    assert serve_cache.gauge == {"m": 1}
    assert asyncio.run(c.evict("m"))
    assert serve_cache.gauge == {"m": 0}


def test_on_a_cuda_device_a_copy_counts_for_the_device_memory_its_load_took_not_the_hosts(monkeypatch):
    """The budget of a replica on a CUDA device is device memory: its first load's host growth (a CUDA context,
    the weights staged on the host) is reported, but the copy counts for what torch allocated on the device."""
    import torch

    from deployments.worker.copies import ModelCopy
    from serve_app.core.registry import ModelSpec
    from serve_app.core.tasks import TaskCatalog
    from tests.unit.test_worker import FakeRuntime

    spec = ModelSpec(id="m", task="text-classification", source={"path": "models/x"})
    copy = ModelCopy(spec, FakeRuntime(spec, "cuda:0"), TaskCatalog.load().task_of(spec))
    host, device = iter([100 * MB, 900 * MB]), iter([10 * MB, 60 * MB])
    monkeypatch.setattr(copies, "resident_bytes", lambda: next(host))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda where: next(device))
    copy.load()
    assert (copy.rss_growth_bytes, copy.device_growth_bytes, copy.size_bytes) == (800 * MB, 50 * MB, 50 * MB)


def test_a_runtime_that_raises_system_exit_or_keyboard_interrupt_fails_its_load_or_request_not_the_replica():
    """Neither is an ``Exception``: asyncio would let them end the replica's event loop, every model on it with it.
    A load that ends in ``sys.exit`` is a failed load that says so, a predict that raises ``KeyboardInterrupt`` a
    503 of its request, and the replica's other work goes on."""
    from deployments.worker.cache import build_copy
    from serve_app.core.errors import ModelFailed

    c, owner, _ = sized_cache(10_000 * MB, a=MB)
    c._live.apply(
        registry(
            spec("a", runtime="tests.byo_runtimes:Sized", parameters={"size": MB}),
            spec("exits", runtime="tests.byo_runtimes:ExitsOnLoad"),
            spec("interrupts", runtime="tests.byo_runtimes:InterruptsPredict"),
        )
    )

    async def scenario():
        serve_wrapper(owner, c.load)
        beside = asyncio.ensure_future(asyncio.sleep(0.05, "the replica's other work"))
        with pytest.raises(ModelUnavailable, match=r"load\(\) raised SystemExit: 2"):
            await c.acquire("exits")
        copy = build_copy(c._live, c._live.registry.get("interrupts")).load()
        batcher = Batcher(ReplicaCounters(), threads=1)
        with copy.held(), pytest.raises(ModelFailed, match=r"predict\(\) raised KeyboardInterrupt"):
            await batcher.infer(copy, [["x"]], None, [None])
        return await beside

    assert asyncio.run(scenario()) == "the replica's other work"
    assert c.status["exits"].load_failures == 1


def test_a_prediction_and_a_load_sent_under_a_reverted_registry_wait_for_the_revert_on_their_worker(monkeypatch):
    """The registry goes A, B, then back to A; the ingress applied the revert, this worker has not yet. A
    prediction (or a load) the ingress sent under A since waits for A here, where its model is back, instead
    of being answered under B, where it is unknown."""
    from ray import serve

    from serve_app.core.live_registry import content_version
    from tests.unit.test_worker import model_cache, worker_of

    c, _ = model_cache()
    w = worker_of(c)
    first, second = registry(spec(), spec("back")), registry(spec())
    asyncio.run(w.reconfigure(first))
    asyncio.run(w.reconfigure(second))
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "back")
    seen: list[bool] = []

    def known_then_stop(model_id: str) -> None:  # what the worker does once caught up: stop there
        seen.append(model_id in c._live.registry)
        raise ModelUnavailable("stop here")

    monkeypatch.setattr(c, "refuse_early", known_then_stop)
    sent = {"registry_version": content_version(first["registry"]), "registry_applied_at": time.time() + 60}

    async def scenario():
        calls = [
            asyncio.ensure_future(w.predict(["x"], **sent)),
            asyncio.ensure_future(w.load(**sent)),
        ]
        for _ in range(20):
            await asyncio.sleep(0)
        assert not any(call.done() for call in calls) and seen == []  # waiting for the revert
        await w.reconfigure(first)  # the revert reaches this worker
        await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(scenario())
    assert seen == [True, True]


class RecordingMetrics:
    """The worker's metrics calls, by name and model."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args[:1], *args[2:]))


def test_an_explicit_load_is_no_cache_hit_and_a_revived_copy_holds_its_size_on_its_gauge_again():
    """``ray_mms_model_cache_hits_total`` counts predictions that found their model; a revived copy (evicted
    while a request ran on it, taken back before it was freed) is loaded, and its size gauge says so."""
    c, owner, _ = sized_cache(10_000 * MB, a=MB)
    c._metrics = metrics = RecordingMetrics()

    async def scenario():
        serve_wrapper(owner, c.load)
        (await c.acquire("a")).release()
        (await c.acquire("a", predicting=False)).release()  # POST /models/a/load, held already
        assert [call for call in metrics.calls if call[0] == "cache_hit"] == []
        (await c.acquire("a")).release()
        assert [call for call in metrics.calls if call[0] == "cache_hit"] == [("cache_hit", "a")]
        held = await c.acquire("a")
        await c.evict("a")  # in use: it lingers
        (await c.acquire("a")).release()  # taken back
        held.release()

    asyncio.run(scenario())
    assert c._counters.revived == 1
    sizes = [call for call in metrics.calls if call[0] in ("loaded", "unloaded", "revived")]
    assert [call[0] for call in sizes] == ["loaded", "unloaded", "revived"] and sizes[-1][-1] == MB


def test_a_models_failure_is_logged_without_the_servers_paths(caplog):
    from deployments.worker.batching import model_failure
    from serve_app.core.paths import PROJECT_ROOT

    copy = fake_copy("m", path="models/x")
    with caplog.at_level("ERROR", logger="ray.serve"):
        model_failure(copy, OSError(f"cannot read {PROJECT_ROOT}/models/x/vocab.txt"))
    assert "models/x/vocab.txt" in caplog.text and str(PROJECT_ROOT) not in caplog.text
