"""The worker's hold on its models, without Ray: a cancelled request never cancels the load it started,
and a model taken by a request is held until the request lets it go."""

import asyncio
import time
import types
import weakref
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from deployments.runtimes.base import ModelRuntime
from deployments.worker.deployment import COMPANY_AT, ModelWorker
from serve_app.core import ray_internals
from serve_app.core.errors import ModelChanged, ModelUnavailable
from serve_app.core.live_registry import LiveRegistry, content_version, registry_user_config
from serve_app.core.registry import ModelSpec, RegistryError, Task
from serve_app.core.schemas import ModelState, ReplicaCounters, ReplicaModelStatus
from tests.helpers import live_registry


class FakeRuntime(ModelRuntime):
    task = Task.TEXT_CLASSIFICATION

    def __init__(self) -> None:
        super().__init__(ModelSpec(id="m", task="text-classification", source={"path": "x"}), device="cpu")
        self._weights = None

    @property
    def loaded(self) -> bool:
        return self._weights is not None

    def _load(self) -> None:
        self._weights = object()

    def _release(self) -> None:
        self._weights = None

    def predict(self, inputs):
        return []


class FakeMetrics:
    def cache_hit(self, model_id):
        pass


def worker(load_s: float = 0.05):
    """A ModelWorker instance without Serve: ``get_model`` stands in for Serve's multiplexed loader."""
    w = ModelWorker.func_or_class.__new__(ModelWorker.func_or_class)
    w._status, w._held, w._counters, w._metrics, w._backoff_s = {}, set(), ReplicaCounters(), FakeMetrics(), 30.0
    runtime, loads = FakeRuntime().load(), []
    w._live = live_registry(runtime.spec)

    async def get_model(model_id):
        loads.append(model_id)
        await asyncio.sleep(load_s)
        return runtime

    w.get_model = get_model
    return w, runtime, loads


def test_a_cancelled_request_does_not_cancel_its_load_and_lets_the_model_go():
    w, runtime, loads = worker()

    async def scenario():
        request = asyncio.ensure_future(w._acquire("m"))
        await asyncio.sleep(0.01)  # the load is under way
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.1)  # the load finishes after its request is gone
        return runtime._in_use

    assert asyncio.run(scenario()) == 0  # held by the load, then let go for the request that left
    assert loads == ["m"] and runtime.loaded


def test_an_acquired_model_is_held_until_released():
    w, runtime, _ = worker(load_s=0)

    async def scenario():
        held = await w._acquire("m")
        assert held is runtime and runtime._in_use == 1
        assert runtime.unload() is True  # evicted while held: the free waits
        assert runtime.loaded
        held.release()
        await asyncio.sleep(0.05)  # the free runs in a thread

    asyncio.run(scenario())
    assert not runtime.loaded


def test_a_failed_load_is_not_tried_again_during_its_back_off():
    w, _, loads = worker()
    w._status["m"] = ReplicaModelStatus(state="failed", last_error="OSError: gone", retry_after=time.time() + 30)
    with pytest.raises(ModelUnavailable, match="not tried again for"):
        asyncio.run(w._acquire("m"))
    assert loads == [] and w._counters.refused_in_backoff == 1


# -- the registry changing under the worker ---------------------------------------------------------------


class FakeCache:
    """What @serve.multiplexed keeps on the instance: the models it holds, under its lock."""

    def __init__(self, **models):
        self.models = OrderedDict(models)
        self._model_cache_lock = asyncio.Lock()
        self._push_multiplexed_replica_info = False


def registry(*entries):
    return registry_user_config({"models": list(entries)}, origin="test")


def spec(model_id="m", path="x", task="text-classification", **extra):
    return {"id": model_id, "task": task, "source": {"path": path}, **extra}


def cached_worker():
    """A worker whose cache holds model 'm' (files 'x'), loaded through the worker's own hold."""
    w, runtime, loads = worker(load_s=0)
    w._lingering, w._runtimes = {}, weakref.WeakSet()
    w._metrics = SimpleNamespace(cache_hit=lambda m: None, unloaded=lambda m: None)
    w._hold("m", runtime)
    w._status["m"].load_count = 1
    setattr(w, ray_internals._MULTIPLEX_ATTR, FakeCache(m=runtime))
    return w, runtime, loads


def test_a_changed_model_leaves_the_cache_at_once_and_is_freed_when_its_request_is_done():
    w, runtime, _ = cached_worker()
    w._status["m"].retry_after, w._status["m"].last_error_at = time.time() + 30, time.time()

    async def scenario():
        assert runtime.hold()  # a request is running on the old copy
        await w.reconfigure(registry(spec(path="y")))
        assert getattr(w, ray_internals._MULTIPLEX_ATTR).models == {}
        assert runtime.loaded and "m" not in w._lingering  # the request finishes on it; nobody takes it back
        runtime.release()
        await asyncio.sleep(0.05)  # the free runs in a thread

    asyncio.run(scenario())
    assert not runtime.loaded
    status = w._status["m"]
    assert status.state is ModelState.NOT_LOADED and status.unload_count == 1 and status.load_count == 1
    assert status.retry_after is None and status.last_error_at is None  # the old files' failure is forgotten


def test_a_removed_model_is_freed_and_forgotten_and_the_others_stay():
    w, runtime, _ = cached_worker()
    other = FakeRuntime().load()
    getattr(w, ray_internals._MULTIPLEX_ATTR).models["o"] = other
    w._live.apply(registry(spec(), spec("o")))
    asyncio.run(w.reconfigure(registry(spec("o"))))
    assert not runtime.loaded and "m" not in w._status
    assert list(getattr(w, ray_internals._MULTIPLEX_ATTR).models) == ["o"] and other.loaded


def test_a_relabelled_model_keeps_its_loaded_copy():
    w, runtime, _ = cached_worker()
    asyncio.run(w.reconfigure(registry(spec(labels=["p", "q"], description="new words"))))
    assert getattr(w, ray_internals._MULTIPLEX_ATTR).models == {"m": runtime} and runtime.loaded
    assert w._status["m"].state is ModelState.LOADED and w._status["m"].unload_count == 0


def test_a_bad_registry_changes_nothing_on_a_running_worker_and_stops_a_starting_one():
    w, runtime, _ = cached_worker()
    version = w._live.version
    asyncio.run(w.reconfigure(registry(spec(path="y"), spec(path="z"))))  # a duplicate id
    assert w._live.version == version and "duplicate model id 'm'" in w._live.status().refused.message
    assert getattr(w, ray_internals._MULTIPLEX_ATTR).models == {"m": runtime} and runtime.loaded
    starting = ModelWorker.func_or_class.__new__(ModelWorker.func_or_class)
    starting._live = LiveRegistry()
    with pytest.raises(RegistryError, match=r"models\.1\.id: duplicate model id 'm'"):
        asyncio.run(starting.reconfigure(registry(spec(path="y"), spec(path="z"))))


def test_a_stale_copy_handed_out_before_the_change_reached_the_cache_is_evicted_and_loaded_again():
    w, stale, _ = cached_worker()
    w._live.apply(registry(spec(path="y")))  # applied; the cache still holds the copy of 'x'
    fresh = FakeRuntime()
    fresh.spec = ModelSpec.model_validate(spec(path="y"))
    fresh.load()
    handed = [stale, fresh]

    async def get_model(model_id):
        return handed.pop(0)

    w.get_model = get_model
    got = asyncio.run(w._get_and_hold("m"))
    assert got is fresh and fresh._in_use == 1
    assert "m" not in getattr(w, ray_internals._MULTIPLEX_ATTR).models and not stale.loaded


def test_preloads_come_with_the_first_registry_in_order_until_the_replica_is_full():
    w, runtime, loads = worker(load_s=0)
    w._live = LiveRegistry()

    async def get_model(model_id):
        loads.append(model_id)
        w._held.add(model_id)
        return runtime

    w.get_model = get_model
    entries = [spec(m, preload=m != "b") for m in ("a", "b", "c", "d")]
    asyncio.run(w.reconfigure(registry(*entries)))
    assert loads == ["a", "c"]
    asyncio.run(w.reconfigure(registry(*entries, spec("e", preload=True))))  # later changes preload nothing
    assert loads == ["a", "c"]


def test_a_request_sent_under_a_registry_this_replica_has_not_applied_waits_for_it(monkeypatch):
    from deployments.worker import deployment

    w, _, _ = worker()
    newer = registry(spec(), spec("added"))
    version = content_version(newer["registry"])

    async def scenario():
        waiting = asyncio.ensure_future(w._catch_up(version))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await w.reconfigure(newer)
        await asyncio.wait_for(waiting, 1)
        await asyncio.wait_for(w._catch_up(version), 0.01)  # run here already: no wait
        await asyncio.wait_for(w._catch_up(None), 0.01)

    w._lingering = {}
    asyncio.run(scenario())
    assert "added" in w._live.registry
    monkeypatch.setattr(deployment, "RELOAD_WAIT_S", 0.05)  # a version that never comes: the wait is bounded
    asyncio.run(asyncio.wait_for(w._catch_up("0123456789ab"), 1))


def test_a_request_decoded_for_another_task_than_the_model_has_now_is_told_to_come_again(monkeypatch):
    from deployments.worker import deployment

    w, runtime, _ = worker(load_s=0)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    with pytest.raises(ModelChanged, match="text-classification model now, no longer image-classification") as e:
        asyncio.run(w.predict(["bytes of an image"], task="image-classification"))
    assert e.value.status_code == 409 and runtime._in_use == 0  # let go of the model


def test_requests_that_arrive_while_a_batch_runs_run_together_in_the_next_batch(monkeypatch):
    """Serve's @serve.batch forms a batch as soon as its first request arrives; the worker holds requests
    until no batch runs, so five that arrive one by one during a batch run as one batch of five, not five
    batches of one."""
    import threading

    from deployments.worker import deployment

    w, runtime, _ = worker(load_s=0)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(deployment.serve, "get_replica_context", lambda: replica)  # @serve.batch reads it
    w._lingering = {}
    w._init_batching()
    w._requests_a_batch = COMPANY_AT  # batches with company of late: the first request goes through the queue too
    # A batch queue of this instance's own: the class's one must stay unused (and picklable) in this process,
    # where the integration tests deploy the class later.
    unbatched = ModelWorker.func_or_class._run_batch.__wrapped__
    w._run_batch = types.MethodType(deployment.serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)(unbatched), w)
    batches, first_batch_may_end = [], threading.Event()

    def predict(inputs):
        batches.append(len(inputs))
        first_batch_may_end.wait(10)
        return [[{"label": "x", "score": 1.0}] for _ in inputs]

    runtime.predict = predict

    async def scenario():
        first = asyncio.ensure_future(w.predict(["a"]))
        while not batches and not first.done():  # until the first batch runs
            await asyncio.sleep(0.01)
        later = []
        for i in range(5):  # arrive one by one while it runs
            later.append(asyncio.ensure_future(w.predict([f"b{i}"])))
            for _ in range(5):
                await asyncio.sleep(0)
        first_batch_may_end.set()
        await asyncio.gather(first, *later)

    asyncio.run(scenario())
    assert batches == [1, 5]


def lone_request_worker(monkeypatch, requests_a_batch: float):
    """A worker whose last batches averaged ``requests_a_batch`` requests, with Serve's batch queue replaced by
    one that batches nothing and records what goes through it, and a model whose first forward pass runs
    until told to end. Returns the worker, its runtime, the queued inputs, the forward passes' inputs, the
    event that ends the first, and the most forward passes seen running at once (a one-item list)."""
    import threading

    from deployments.worker import deployment

    w, runtime, _ = worker(load_s=0)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    w._lingering = {}
    w._init_batching()
    w._requests_a_batch = requests_a_batch
    batch = ModelWorker.func_or_class._run_batch.__wrapped__  # the batch function, without Serve's queue
    queued, forwards, first_may_end, running, most = [], [], threading.Event(), [0], [0]
    lock = threading.Lock()

    async def through_the_queue(inputs, runtime):  # as Serve's queue: the batch runs in a task of its own
        queued.append(list(inputs))
        return (await asyncio.shield(asyncio.ensure_future(batch(w, [inputs], [runtime]))))[0]

    def predict(inputs):
        with lock:
            forwards.append(list(inputs))
            running[0] += 1
            most[0] = max(most[0], running[0])
        if len(forwards) == 1:
            first_may_end.wait(10)
        with lock:
            running[0] -= 1
        return [[{"label": "x", "score": 1.0}] for _ in inputs]

    w._run_batch = through_the_queue
    runtime.predict = predict
    return w, runtime, queued, forwards, first_may_end, most


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait, polling the event loop, until ``condition()`` holds (a TimeoutError fails the test instead of
    hanging it)."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


def test_a_lone_request_runs_at_once_and_those_that_arrive_meanwhile_go_through_the_batch_queue(monkeypatch):
    """On a replica whose batches have had one request each of late (one client), a request alone has nothing
    to be batched with: it runs at once, as a batch of one, without waiting in Serve's batch queue for
    company. Requests that arrive while it runs wait for it, then go through the queue together."""
    w, _, queued, forwards, first_may_end, most = lone_request_worker(monkeypatch, requests_a_batch=1.0)

    async def scenario():
        first = asyncio.ensure_future(w.predict(["alone"]))
        await until(lambda: forwards)  # its forward pass runs
        later = asyncio.ensure_future(w.predict(["meanwhile"]))
        await until(lambda: w._predicting == 2)  # the second has its inputs ready
        for _ in range(5):
            await asyncio.sleep(0)
        held = not later.done() and not queued  # waits for the model thread, not in the queue yet
        first_may_end.set()
        await asyncio.gather(first, later)
        return held

    assert asyncio.run(scenario())
    assert forwards == [["alone"], ["meanwhile"]] and most == [1]
    assert queued == [["meanwhile"]]  # only the request that had company went through the queue
    assert w._predicting == 0 and w._batches_running == 0 and w._no_batch_running.is_set()


def test_two_requests_that_reach_an_idle_replica_together_never_run_two_forward_passes_at_once(monkeypatch):
    """The lone request's batch counts as running from the moment it is chosen, not from its first step on
    the event loop: a request that arrives in between waits for it instead of starting a second batch."""
    w, _, queued, forwards, first_may_end, most = lone_request_worker(monkeypatch, requests_a_batch=1.0)

    async def scenario():
        both = asyncio.gather(w.predict(["a"]), w.predict(["b"]))
        await until(lambda: forwards and w._predicting == 2)
        for _ in range(5):
            await asyncio.sleep(0)
        first_may_end.set()
        await both

    asyncio.run(scenario())
    assert most == [1] and forwards == [["a"], ["b"]] and queued == [["b"]]


@pytest.mark.parametrize("requests_a_batch", [1.0, COMPANY_AT], ids=["lone", "queued"])
def test_a_request_that_leaves_mid_forward_leaves_its_model_held_until_the_pass_ends(monkeypatch, requests_a_batch):
    """The client leaves while its request's forward pass runs (a lone request's batch of one, or a batch
    from the queue): the request is gone at once, but the batch still counts as running (the next requests
    wait for it) and still holds the model, so an eviction meanwhile waits for the pass to end."""
    w, runtime, queued, forwards, first_may_end, _ = lone_request_worker(monkeypatch, requests_a_batch)

    async def scenario():
        request = asyncio.ensure_future(w.predict(["leaves"]))
        await until(lambda: forwards)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        during = (w._predicting, w._batches_running, runtime._in_use, w._no_batch_running.is_set())
        deferred = runtime.unload()  # Serve's LRU evicts it now
        still_loaded = runtime.loaded
        first_may_end.set()
        await until(lambda: w._batches_running == 0 and not runtime.loaded)  # freed once the pass is done
        return during, deferred, still_loaded

    assert asyncio.run(scenario()) == ((0, 1, 1, False), True, True)
    assert runtime._in_use == 0 and w._no_batch_running.is_set()
    assert queued == ([] if requests_a_batch < COMPANY_AT else [["leaves"]])


def test_once_batches_have_company_a_request_that_finds_the_replica_idle_goes_through_the_queue(monkeypatch):
    """Under load, requests come back in bunches (a batch's clients send their next requests at about the
    same time): once this replica's batches average COMPANY_AT requests or more, a request that finds it idle
    goes through Serve's batch queue, whose wait gathers the rest of its bunch."""
    w, runtime, queued, forwards, first_may_end, _ = lone_request_worker(monkeypatch, requests_a_batch=1.0)
    first_may_end.set()
    batch = ModelWorker.func_or_class._run_batch.__wrapped__

    async def scenario():
        for _ in range(3):  # three batches of four requests
            await batch(w, [["a"], ["b"], ["c"], ["d"]], [runtime] * 4)
        return await w.predict(["alone"])

    asyncio.run(scenario())
    assert w._requests_a_batch >= COMPANY_AT
    assert queued == [["alone"]] and forwards[-1] == ["alone"]


def test_requests_on_two_copies_of_a_model_in_one_batch_each_run_on_their_own_copy():
    """Serve batches by model id: after a registry change replaced a model's copy, requests still on the old
    copy and new ones on the new copy can share a batch. Each copy gets a model call of its own, so that a
    request finishes on the copy it started on; both copies are held while their call runs."""
    w, old, _ = worker(load_s=0)
    w._lingering = {}
    w._init_batching()
    new = FakeRuntime().load()
    calls = []

    def answering(copy, label):
        def predict(inputs):
            calls.append((label, list(inputs), copy._in_use))
            return [[{"label": label, "score": 1.0}] for _ in inputs]

        return predict

    old.predict, new.predict = answering(old, "old"), answering(new, "new")
    batch = ModelWorker.func_or_class._run_batch.__wrapped__
    answers = asyncio.run(batch(w, [["a"], ["b"], ["c"]], [old, new, old]))
    assert [a[0][0]["label"] for a in answers] == ["old", "new", "old"]  # each request's one input
    assert calls == [("old", ["a", "c"], 1), ("new", ["b"], 1)]  # one call per copy, each held for it
    assert old._in_use == new._in_use == 0 and w._batches_running == 0


def test_each_model_copy_runs_its_forward_passes_on_one_thread_of_its_own_until_it_is_freed():
    """A copy's batches all run on the same thread (ModelRuntime.thread: its allocator arena and torch state
    stay the same), not on another copy's (two models' batches can run at once); freeing the copy ends its
    thread, and so does freeing a copy that was unloaded already."""
    import threading

    w, first, _ = worker(load_s=0)
    second = FakeRuntime().load()
    seen = {first: [], second: []}
    for copy, threads in seen.items():
        copy.predict = lambda inputs, threads=threads: threads.append(threading.current_thread()) or []

    async def requests():
        for _ in range(3):
            for copy in seen:
                await w._infer(copy, ["x"])

    asyncio.run(requests())
    (one,), (other,) = set(seen[first]), set(seen[second])
    assert one is not other
    first.free()
    one.join(5)
    assert not one.is_alive() and other.is_alive()
    second.mark_unloaded()
    second._release()  # unloaded by other means than free: a free still ends the thread
    second.free()
    other.join(5)
    assert not other.is_alive()
