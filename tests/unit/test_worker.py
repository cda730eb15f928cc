"""The worker replica without Ray: its model cache (deployments/worker/cache.py), its batching
(deployments/worker/batching.py) and the deployment that joins them. A cancelled request never cancels the
load it started, a model taken by a request is held until the request lets it go, registry changes take
stale copies out, and requests are batched per model."""

import asyncio
import threading
import time
import types
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from deployments.runtimes import ModelRuntime
from deployments.worker import batching, cache
from deployments.worker.batching import COMPANY_AT, Batcher
from deployments.worker.cache import ModelCache
from deployments.worker.copies import ModelCopy
from deployments.worker.deployment import ModelWorker
from serve_app.core import ray_internals
from serve_app.core.errors import ModelChanged, ModelNotFound, ModelUnavailable
from serve_app.core.live_registry import LiveRegistry, content_version, registry_user_config
from serve_app.core.registry import ModelSpec, RegistryError
from serve_app.core.schemas import ModelState, ReplicaCounters, ReplicaModelStatus
from serve_app.core.tasks import TaskCatalog
from tests.helpers import live_registry, until


class FakeRuntime(ModelRuntime):
    def load(self) -> None:
        self.weights = object()

    def unload(self) -> None:
        self.weights = None

    def predict(self, inputs):
        return [[("x", 1.0)] for _ in inputs]


def fake_copy(model_id: str = "m", path: str = "models/x") -> ModelCopy:
    spec = ModelSpec(id=model_id, task="text-classification", source={"path": path})
    return ModelCopy(spec, FakeRuntime(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()


class FakeMetrics:
    def __getattr__(self, name):
        return lambda *args: None


class FakeCache:
    """What @serve.multiplexed keeps on the instance: the models it holds, under its lock."""

    def __init__(self, **models):
        self.models = OrderedDict(models)
        self._model_cache_lock = asyncio.Lock()
        self._push_multiplexed_replica_info = False
        self.gauge: dict[str, float] = {m: 1 for m in models}  # serve_registered_multiplexed_model_id, per model
        self.registered_model_gauge = SimpleNamespace(
            set=lambda value, tags: self.gauge.update({tags["model_id"]: value})
        )


class Owner:
    """The deployment as the cache sees it: ``get_model`` stands in for Serve's multiplexed loader, which
    hands out ``copy`` (or the next of ``handed``) after ``load_s``."""

    def __init__(self, copy: ModelCopy, load_s: float = 0.05) -> None:
        self.copy, self.load_s, self.loads, self.loaded, self.handed = copy, load_s, [], [], []

    async def get_model(self, model_id):
        self.loads.append(model_id)  # begun
        await asyncio.sleep(self.load_s)
        self.loaded.append(model_id)  # finished
        return self.handed.pop(0) if self.handed else self.copy


def model_cache(load_s: float = 0.05) -> tuple[ModelCache, Owner]:
    copy = fake_copy()
    owner = Owner(copy, load_s)
    return ModelCache(owner, live_registry(copy.spec), ReplicaCounters(), FakeMetrics(), 30.0), owner


def cached(load_s: float = 0) -> tuple[ModelCache, Owner]:
    """A cache that holds model 'm' (files 'models/x'), loaded through the cache's own hold, in Serve's cache."""
    c, owner = model_cache(load_s)
    c._hold("m", owner.copy)
    c.status["m"].load_count = 1
    setattr(owner, ray_internals._MULTIPLEX_ATTR, FakeCache(m=owner.copy))
    return c, owner


def registry(*entries):
    return registry_user_config({"models": list(entries)}, origin="test")


def spec(model_id="m", path="models/x", task="text-classification", **extra):
    return {"id": model_id, "task": task, "source": {"path": path}, **extra}


# -- the cache ------------------------------------------------------------------------------------------


def test_a_cancelled_request_does_not_cancel_its_load_and_lets_the_model_go():
    c, owner = model_cache()

    async def scenario():
        request = asyncio.ensure_future(c.acquire("m"))
        await until(lambda: owner.loads)  # the load is under way
        assert not request.done()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(lambda: owner.loaded)  # the load finishes after its request left...
        await until(lambda: owner.copy.in_use == 0)  # ...and lets the model go

    asyncio.run(scenario())
    assert owner.loads == owner.loaded == ["m"] and owner.copy.loaded  # held by the load, let go for no request


def test_an_acquired_model_is_held_until_released():
    c, owner = model_cache(load_s=0)

    async def scenario():
        held = await c.acquire("m")
        assert held is owner.copy and held.in_use == 1
        assert held.unload() is True  # evicted while held: the free waits
        assert held.loaded
        held.release()
        await until(lambda: not held.loaded)  # the free runs in a thread

    asyncio.run(scenario())


def test_a_failed_load_is_not_tried_again_during_its_back_off():
    c, owner = model_cache()
    c.status["m"] = ReplicaModelStatus(state="failed", last_error="OSError: gone", retry_after=time.time() + 30)
    with pytest.raises(ModelUnavailable, match="not tried again for"):
        asyncio.run(c.acquire("m"))
    assert owner.loads == [] and c._counters.refused_in_backoff == 1


def test_a_runtime_class_that_cannot_be_imported_is_a_failed_load_with_its_reason():
    catalog = TaskCatalog.load(runtime_modules=["tests.nowhere"])
    live = LiveRegistry(catalog)
    live.apply(registry(spec(runtime="tests.nowhere:Model")))
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 30.0)
    with pytest.raises(
        ModelUnavailable, match=r"could not be loaded: RuntimeImportError: .*importing 'tests\.nowhere'"
    ):
        asyncio.run(c.load("m"))
    status = c.status["m"]
    assert status.state is ModelState.FAILED and "ModuleNotFoundError" in status.last_error
    assert status.retry_after is not None and status.load_failures == 1


def test_a_load_whose_clean_up_raises_too_is_a_failed_load_with_the_loads_reason():
    """A runtime whose load fails, and whose unload then fails on what the load never made: the request
    gets the load's 503, the model shows failed with the load's reason, and is not tried again at once."""
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"]))
    live.apply(registry(spec(runtime="tests.byo_runtimes:FailsToLoadAndToUnload")))
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 30.0)
    with pytest.raises(ModelUnavailable, match="could not be loaded: RuntimeError: the license server did not answer"):
        asyncio.run(c.load("m"))
    status = c.status["m"]
    assert status.state is ModelState.FAILED and status.retry_after is not None and status.load_failures == 1


def test_a_load_of_a_runtime_of_ones_own_records_its_sizes(tmp_path):
    from tests.byo_runtimes import KEYWORDS, write_training_data

    folder = write_training_data(tmp_path / "tickets", KEYWORDS)
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"], model_roots=[str(tmp_path)]))
    live.apply(registry(spec(path=str(folder), runtime="tests.byo_runtimes:TfidfClassifier")))
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 30.0)
    loaded = asyncio.run(c.load("m"))
    status = c.status["m"]
    assert status.state is ModelState.LOADED and status.weights_bytes == loaded.runtime.size_bytes() > 0
    assert status.rss_growth_bytes == loaded.rss_growth_bytes is not None
    (answer,) = loaded.answer([["I was charged twice"]])
    assert answer["labels"][0, 0] == "billing"


def test_a_link_pointed_out_of_the_model_roots_after_the_registry_was_checked_fails_the_load(tmp_path):
    """The registry's check resolves links when it is applied; a link under a root swapped later is caught
    when the model loads, before its files are read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(root / "real")
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"], model_roots=[str(root)]))
    live.apply(registry(spec(path=str(root / "link"), runtime="tests.byo_runtimes:Sized", parameters={"size": 1})))
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 0.0)
    (root / "link").unlink()
    (root / "link").symlink_to(outside)
    with pytest.raises(ModelUnavailable, match=r"outside the model roots.*checked again at load"):
        asyncio.run(c.load("m"))
    (root / "link").unlink()
    (root / "link").symlink_to(root / "real")
    assert asyncio.run(c.load("m")).loaded and c.status["m"].load_failures == 1


def test_a_model_folder_whose_files_link_out_of_the_model_roots_fails_its_load(tmp_path):
    """The folder lies under a root, its weights do not (a hostile review): each link among its files and
    subfolders is resolved before any file is read; links within the roots are fine."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "m" / "1_Pooling").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"weights")
    (root / "shared.json").write_text("{}")
    (root / "m" / "config.json").symlink_to(root / "shared.json")  # within the roots
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"], model_roots=[str(root)]))
    live.apply(registry(spec(path=str(root / "m"), runtime="tests.byo_runtimes:Sized", parameters={"size": 1})))
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 0.0)
    assert asyncio.run(c.load("m")).loaded
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 0.0)
    (root / "m" / "1_Pooling" / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ModelUnavailable, match=r"has a link out of the model roots: '1_Pooling/model.safetensors'"):
        asyncio.run(c.load("m"))
    # Through a link to a folder within the roots, and in a loop of links: each folder is read once.
    (root / "m" / "1_Pooling" / "model.safetensors").unlink()
    (root / "other" / "deeper").mkdir(parents=True)
    (root / "other" / "deeper" / "again").symlink_to(root / "other")  # a loop
    (root / "m" / "sub").symlink_to(root / "other")
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 0.0)
    assert asyncio.run(c.load("m")).loaded
    (root / "other" / "w.bin").symlink_to(outside / "model.safetensors")
    c = ModelCache(Owner(fake_copy()), live, ReplicaCounters(), FakeMetrics(), 0.0)
    with pytest.raises(ModelUnavailable, match=r"has a link out of the model roots: 'sub/w.bin'"):
        asyncio.run(c.load("m"))


def test_a_changed_model_leaves_the_cache_at_once_and_is_freed_when_its_request_is_done():
    c, owner = cached()
    c.status["m"].retry_after, c.status["m"].last_error_at = time.time() + 30, time.time()
    live = c._live

    async def scenario():
        assert owner.copy.hold()  # a request is running on the old copy
        await c.apply(live.apply(registry(spec(path="models/y"))))
        assert getattr(owner, ray_internals._MULTIPLEX_ATTR).models == {}
        assert owner.copy.loaded and "m" not in c.lingering  # the request finishes on it; nobody takes it back
        owner.copy.release()
        await until(lambda: not owner.copy.loaded)  # the free runs in a thread

    asyncio.run(scenario())
    status = c.status["m"]
    assert status.state is ModelState.NOT_LOADED and status.unload_count == 1 and status.load_count == 1
    assert status.retry_after is None and status.last_error_at is None  # the old files' failure is forgotten


@pytest.mark.parametrize("old_first", [True, False])
def test_a_models_idle_thread_measures_are_its_held_copys_not_those_of_a_copy_a_change_replaced(old_first):
    """A registry change replaced the copy while a request still runs on the old one: both are loaded, and
    the report is the new copy's, whichever of them the replica lists first."""
    c, owner = cached()
    old = owner.copy
    old.idle_threads.record(True, 0.050)

    async def scenario():
        assert old.hold()  # a request is running on the old copy
        await c.apply(c._live.apply(registry(spec(path="models/y"))))
        new = c._hold("m", fake_copy(path="models/y"))
        new.idle_threads.record(True, 0.005)
        c.copies = [old, new] if old_first else [new, old]
        report = c.report()["m"]["idle_threads"]
        old.release()
        await until(lambda: not old.loaded)
        return report

    assert old.loaded
    assert asyncio.run(scenario())["idle_threads_ms"] == 5.0


def test_a_removed_model_is_freed_and_forgotten_and_the_others_stay():
    c, owner = cached()
    other = fake_copy("o")
    getattr(owner, ray_internals._MULTIPLEX_ATTR).models["o"] = other
    c._live.apply(registry(spec(), spec("o")))
    asyncio.run(c.apply(c._live.apply(registry(spec("o")))))
    assert not owner.copy.loaded and "m" not in c.status
    assert list(getattr(owner, ray_internals._MULTIPLEX_ATTR).models) == ["o"] and other.loaded


@pytest.mark.parametrize(
    "change, stays",
    [
        ({"labels": ["p", "q"], "description": "new words"}, True),
        ({"parameters": {"max_seq_length": 8}}, False),
        ({"runtime": "deployments.tasks.text_classification:TextClassificationRuntime"}, False),
    ],
    ids=["relabelled", "new parameters", "another runtime"],
)
def test_what_a_change_keeps_and_what_it_loads_again(change, stays):
    c, owner = cached()
    asyncio.run(c.apply(c._live.apply(registry(spec(**change)))))
    held = getattr(owner, ray_internals._MULTIPLEX_ATTR).models
    assert (held == {"m": owner.copy} and owner.copy.loaded) is stays
    assert (c.status["m"].state is ModelState.LOADED) is stays


def test_a_stale_copy_handed_out_before_the_change_reached_the_cache_is_evicted_and_loaded_again():
    c, owner = cached()
    stale = owner.copy
    c._live.apply(registry(spec(path="models/y")))  # applied; the cache still holds the copy of 'models/x'
    fresh = fake_copy(path="models/y")
    owner.handed = [stale, fresh]
    got = asyncio.run(c._get_and_hold("m"))
    assert got is fresh and fresh.in_use == 1
    assert "m" not in getattr(owner, ray_internals._MULTIPLEX_ATTR).models and not stale.loaded


def test_preloads_come_with_the_first_registry_in_order_until_the_replica_is_full():
    c, owner = model_cache(load_s=0)
    c._live = LiveRegistry()

    async def get_model(model_id):
        owner.loads.append(model_id)
        c.held.add(model_id)
        return owner.copy

    owner.get_model = get_model
    w = worker_of(c)
    entries = [spec(m, preload=m != "b") for m in ("a", "b", "c", "d")]
    asyncio.run(w.reconfigure(registry(*entries)))
    assert owner.loads == ["a", "c"]
    asyncio.run(w.reconfigure(registry(*entries, spec("e", preload=True))))  # later changes preload nothing
    assert owner.loads == ["a", "c"]


def test_a_request_sent_under_a_registry_this_replica_has_not_applied_waits_for_it(monkeypatch):
    c, _ = model_cache()
    w = worker_of(c)
    newer = registry(spec(), spec("added"))
    version = content_version(newer["registry"])

    async def scenario():
        waiting = asyncio.ensure_future(c.catch_up("added", version))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done()
        await w.reconfigure(newer)
        await asyncio.wait_for(waiting, 1)
        await asyncio.wait_for(c.catch_up("added", version), 0.01)  # run here already: no wait
        await asyncio.wait_for(c.catch_up("added", None), 0.01)

    asyncio.run(scenario())
    assert "added" in c._live.registry
    # A version that does not come within the wait (Serve reconfigures this replica late): a 503 to send the
    # request again, not an answer under the registry this replica still runs.
    monkeypatch.setattr(cache, "RELOAD_WAIT_S", 0.05)
    with pytest.raises(ModelUnavailable, match="has not applied registry 0123456789ab") as refused:
        asyncio.run(asyncio.wait_for(c.catch_up("added", "0123456789ab"), 1))
    assert refused.value.status_code == 503 and refused.value.details.get("retry_after_s") == 1


# -- the deployment -------------------------------------------------------------------------------------


def worker_of(c: ModelCache, max_concurrent_decodes: int = 1) -> ModelWorker:
    """A ModelWorker instance around a cache, without Serve."""
    from concurrent.futures import ThreadPoolExecutor

    w = ModelWorker.func_or_class.__new__(ModelWorker.func_or_class)
    w._live, w._counters, w._cache = c._live, c._counters, c
    w._batcher = Batcher(c._counters)
    w._decoders = ThreadPoolExecutor(max_workers=max_concurrent_decodes)
    w._decoding, w._decoding_lock = 0, threading.Lock()
    return w


def test_a_bad_registry_changes_nothing_on_a_running_worker_and_stops_a_starting_one():
    c, owner = cached()
    w = worker_of(c)
    version = c._live.version
    asyncio.run(w.reconfigure(registry(spec(path="models/y"), spec(path="models/z"))))  # a duplicate id
    assert c._live.version == version and "duplicate model id 'm'" in c._live.status().refused.message
    assert getattr(owner, ray_internals._MULTIPLEX_ATTR).models == {"m": owner.copy} and owner.copy.loaded
    starting = ModelWorker.func_or_class.__new__(ModelWorker.func_or_class)
    starting._live = LiveRegistry()
    with pytest.raises(RegistryError, match=r"models\.1\.id: duplicate model id 'm'"):
        asyncio.run(starting.reconfigure(registry(spec(path="models/y"), spec(path="models/z"))))


def test_a_request_decoded_for_another_task_than_the_model_has_now_is_told_to_come_again(monkeypatch):
    from deployments.worker import deployment

    c, owner = model_cache(load_s=0)
    w = worker_of(c)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    with pytest.raises(ModelChanged, match="text-classification model now, no longer image-classification") as e:
        asyncio.run(w.predict(["bytes of an image"], task="image-classification"))
    assert e.value.status_code == 409 and owner.copy.in_use == 0  # let go of the model


def test_an_unload_for_another_replica_unloads_nothing_here(monkeypatch):
    """The router sends an unload for one replica there alone; one that arrived elsewhere leaves the model."""
    from deployments.worker import deployment

    c, owner = cached()
    w = worker_of(c)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="here"))
    monkeypatch.setattr(deployment.serve, "get_replica_context", lambda: context)
    assert asyncio.run(w.unload(on_replica="elsewhere")) is False
    assert getattr(owner, ray_internals._MULTIPLEX_ATTR).models == {"m": owner.copy} and owner.copy.loaded
    assert asyncio.run(w.unload(on_replica="here")) is True
    assert getattr(owner, ray_internals._MULTIPLEX_ATTR).models == {}


def test_a_replica_counts_the_time_of_its_requests_and_of_its_models_passes_within_it(monkeypatch):
    """predict_seconds covers each request from its call to its answer; model_seconds the model's own calls,
    which lie within it (the benchmark's breakdown of the hot path subtracts one from the other)."""
    from deployments.worker import deployment

    c, owner = model_cache(load_s=0)
    w = worker_of(c)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    monkeypatch.setattr(owner.copy.runtime, "predict", lambda inputs: time.sleep(0.02) or [[("x", 1.0)]] * len(inputs))
    asyncio.run(w.predict(["a"]))
    first = w._counters.model_copy()
    asyncio.run(w.predict(["b", "c"]))
    assert first.model_seconds >= 0.02 and first.predict_seconds >= first.model_seconds
    assert w._counters.model_seconds >= first.model_seconds + 0.02  # a second batch, counted on top
    assert w._counters.predict_seconds - first.predict_seconds >= w._counters.model_seconds - first.model_seconds


def _decodes_at_once(threads: int) -> int:
    """The most requests' images a worker with ``threads`` decode threads decoded at once, of 3 sent together
    (with 3 threads, the decodes wait for each other)."""
    together = threading.Barrier(3, timeout=10) if threads == 3 else None

    class Decoding(FakeRuntime):
        def prepare(self, inputs):
            together.wait() if together is not None else time.sleep(0.05)
            return inputs

    spec = ModelSpec(id="m", task="image-classification", source={"path": "models/x"})
    copy = ModelCopy(spec, Decoding(spec, "cpu"), TaskCatalog.load().task_of(spec)).load()
    c = ModelCache(Owner(copy, 0), live_registry(spec), ReplicaCounters(), FakeMetrics(), 30.0)
    w = worker_of(c, max_concurrent_decodes=threads)

    async def answer(inputs, copy, threads=None, parameters=None):
        return {"label": inputs}

    w._batcher = SimpleNamespace(predict=answer)  # the decodes are what counts here, not the batches

    async def flood():
        await asyncio.gather(*(w.predict([b"image"], task="image-classification") for _ in range(3)))

    asyncio.run(flood())
    return c._counters.most_decodes_at_once


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda inputs: int("not a number"), "failed to prepare this input: ValueError: invalid literal"),
        (lambda inputs: inputs[:-1], "outside the image-classification contract: prepare must answer one item per"),
        (lambda inputs: None, "prepare must answer one item per input: 2 inputs, got NoneType"),
    ],
)
def test_a_prepare_that_raises_or_answers_another_number_of_inputs_fails_its_request_with_503(
    monkeypatch, prepare, reason
):
    from deployments.worker import deployment

    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")

    class Preparing(FakeRuntime):
        pass

    Preparing.prepare = lambda self, inputs: prepare(inputs)
    model = ModelSpec(id="m", task="image-classification", source={"path": "models/x"})
    copy = ModelCopy(model, Preparing(model, "cpu"), TaskCatalog.load().task_of(model)).load()
    w = worker_of(ModelCache(Owner(copy, 0), live_registry(model), ReplicaCounters(), FakeMetrics(), 30.0))
    with pytest.raises(ModelUnavailable, match=reason) as e:
        asyncio.run(w.predict([b"one image", b"another"], task="image-classification"))
    assert e.value.status_code == 503 and copy.in_use == 0
    # The model's own code failed the request: GET /models counts it, with what the client read.
    status = w._cache.model_status("m")
    assert (status.request_failures, status.last_request_error) == (1, e.value.message)


def test_a_prepare_may_answer_a_tuple_or_an_array_of_one_item_per_input(monkeypatch):
    import numpy as np

    from deployments.worker import deployment

    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")

    class Stacking(FakeRuntime):
        def prepare(self, inputs):
            return np.stack([np.frombuffer(i, dtype=np.uint8) for i in inputs])  # [inputs, bytes]

        def predict(self, inputs):
            return [[(f"sum {int(row.sum())}", 1.0)] for row in inputs]

    model = ModelSpec(id="m", task="image-classification", source={"path": "models/x"})
    copy = ModelCopy(model, Stacking(model, "cpu"), TaskCatalog.load().task_of(model)).load()
    w = worker_of(ModelCache(Owner(copy, 0), live_registry(model), ReplicaCounters(), FakeMetrics(), 30.0))
    result = asyncio.run(w.predict([b"\x01\x02", b"\x03\x04"], task="image-classification"))
    assert result.outputs["labels"][:, 0].tolist() == ["sum 3", "sum 7"]


def test_the_inputs_of_concurrent_requests_are_decoded_at_most_max_concurrent_decodes_at_a_time(monkeypatch):
    """Requests whose images a replica decodes wait for the decode threads (worker.max_concurrent_decodes):
    a flood of costly images takes that many threads, not one each."""
    from deployments.worker import deployment

    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "m")
    assert _decodes_at_once(1) == 1
    assert _decodes_at_once(3) == 3  # the counter counts what overlaps


# -- batching -------------------------------------------------------------------------------------------


def blocking_copy(copy: ModelCopy):
    """Make the copy's forward passes record their inputs and the most passes seen running at once; the
    first pass runs until the returned event is set."""
    forwards, first_may_end, running, most = [], threading.Event(), [0], [0]
    lock = threading.Lock()

    def predict(inputs):
        with lock:
            forwards.append(list(inputs))
            running[0] += 1
            most[0] = max(most[0], running[0])
        if len(forwards) == 1:
            first_may_end.wait(10)
        with lock:
            running[0] -= 1
        return [[("x", 1.0)] for _ in inputs]

    copy.runtime.predict = predict
    return forwards, first_may_end, most


def lone_request_batcher(requests_a_batch: float):
    """A batcher whose last batches averaged ``requests_a_batch`` requests, with Serve's batch queue replaced
    by one that batches nothing and records what goes through it, over a copy whose first forward pass
    runs until told to end."""
    copy = fake_copy()
    b = Batcher(ReplicaCounters())
    b.requests_a_batch = requests_a_batch
    batch = Batcher.run_batch.__wrapped__  # the batch function, without Serve's queue
    queued = []

    async def through_the_queue(inputs, copy, threads=None, parameters=None):  # as Serve's queue: a task of its own
        queued.append(list(inputs))
        batched = batch(b, [inputs], [copy], [threads], [parameters])
        return (await asyncio.shield(asyncio.ensure_future(batched)))[0]

    b.run_batch = through_the_queue
    return b, copy, queued, *blocking_copy(copy)


async def predict(b: Batcher, copy: ModelCopy, inputs):
    """A request as the deployment runs it: the copy held around the batcher."""
    with copy.held():
        return await b.predict(inputs, copy)


def test_requests_that_arrive_while_a_batch_runs_run_together_in_the_next_batch(monkeypatch):
    """Serve's @serve.batch forms a batch as soon as its first request arrives; the batcher holds requests
    until no batch runs, so five that arrive one by one during a batch run as one batch of five, not five
    batches of one."""
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
    monkeypatch.setattr(batching.serve, "get_replica_context", lambda: replica)  # @serve.batch reads it
    copy = fake_copy()
    b = Batcher(ReplicaCounters())
    b.requests_a_batch = COMPANY_AT  # batches with company of late: the first request goes through the queue too
    # A batch queue of this instance's own: the class's one must stay unused (and picklable) in this process,
    # where the integration tests deploy the class later.
    unbatched = Batcher.run_batch.__wrapped__
    b.run_batch = types.MethodType(batching.serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)(unbatched), b)
    forwards, first_may_end, _ = blocking_copy(copy)

    async def scenario():
        first = asyncio.ensure_future(predict(b, copy, ["a"]))
        await until(lambda: forwards or first.done())  # until the first batch runs
        later = []
        for i in range(5):  # arrive one by one while it runs
            later.append(asyncio.ensure_future(predict(b, copy, [f"b{i}"])))
            for _ in range(5):
                await asyncio.sleep(0)
        first_may_end.set()
        await asyncio.gather(first, *later)

    asyncio.run(scenario())
    assert [len(f) for f in forwards] == [1, 5]


def test_a_lone_request_runs_at_once_and_those_that_arrive_meanwhile_go_through_the_batch_queue():
    """On a replica whose batches have had one request each of late (one client), a request alone has nothing
    to be batched with: it runs at once, as a batch of one, without waiting in Serve's batch queue for
    company. Requests that arrive while it runs wait for it, then go through the queue together."""
    b, copy, queued, forwards, first_may_end, most = lone_request_batcher(requests_a_batch=1.0)

    async def scenario():
        first = asyncio.ensure_future(predict(b, copy, ["alone"]))
        await until(lambda: forwards)  # its forward pass runs
        later = asyncio.ensure_future(predict(b, copy, ["meanwhile"]))
        await until(lambda: b.predicting == 2)  # the second has its inputs ready
        for _ in range(5):
            await asyncio.sleep(0)
        held = not later.done() and not queued  # waits for the model thread, not in the queue yet
        first_may_end.set()
        await asyncio.gather(first, later)
        return held

    assert asyncio.run(scenario())
    assert forwards == [["alone"], ["meanwhile"]] and most == [1]
    assert queued == [["meanwhile"]]  # only the request that had company went through the queue
    assert b.predicting == 0 and b.batches_running == 0 and b.no_batch_running.is_set()


def test_two_requests_that_reach_an_idle_replica_together_never_run_two_forward_passes_at_once():
    """The lone request's batch counts as running from the moment it is chosen, not from its first step on
    the event loop: a request that arrives in between waits for it instead of starting a second batch."""
    b, copy, queued, forwards, first_may_end, most = lone_request_batcher(requests_a_batch=1.0)

    async def scenario():
        both = asyncio.gather(predict(b, copy, ["a"]), predict(b, copy, ["b"]))
        await until(lambda: forwards and b.predicting == 2)
        for _ in range(5):
            await asyncio.sleep(0)
        first_may_end.set()
        await both

    asyncio.run(scenario())
    assert most == [1] and forwards == [["a"], ["b"]] and queued == [["b"]]


@pytest.mark.parametrize("requests_a_batch", [1.0, COMPANY_AT], ids=["lone", "queued"])
def test_a_request_that_leaves_mid_forward_leaves_its_model_held_until_the_pass_ends(requests_a_batch):
    """The client leaves while its request's forward pass runs (a lone request's batch of one, or a batch
    from the queue): the request is gone at once, but the batch still counts as running (the next requests
    wait for it) and still holds the model, so an eviction meanwhile waits for the pass to end."""
    b, copy, queued, forwards, first_may_end, _ = lone_request_batcher(requests_a_batch)

    async def scenario():
        request = asyncio.ensure_future(predict(b, copy, ["leaves"]))
        await until(lambda: forwards)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        during = (b.predicting, b.batches_running, copy.in_use, b.no_batch_running.is_set())
        deferred = copy.unload()  # Serve's LRU evicts it now
        still_loaded = copy.loaded
        first_may_end.set()
        await until(lambda: b.batches_running == 0 and not copy.loaded)  # freed once the pass is done
        return during, deferred, still_loaded

    assert asyncio.run(scenario()) == ((0, 1, 1, False), True, True)
    assert copy.in_use == 0 and b.no_batch_running.is_set()
    assert queued == ([] if requests_a_batch < COMPANY_AT else [["leaves"]])


def test_once_batches_have_company_a_request_that_finds_the_replica_idle_goes_through_the_queue():
    """Under load, requests come back in bunches (a batch's clients send their next requests at about the
    same time): once this replica's batches average COMPANY_AT requests or more, a request that finds it idle
    goes through Serve's batch queue, whose wait gathers the rest of its bunch."""
    b, copy, queued, forwards, first_may_end, _ = lone_request_batcher(requests_a_batch=1.0)
    first_may_end.set()
    batch = Batcher.run_batch.__wrapped__

    async def scenario():
        for _ in range(3):  # three batches of four requests
            await batch(b, [["a"], ["b"], ["c"], ["d"]], [copy] * 4)
        return await predict(b, copy, ["alone"])

    asyncio.run(scenario())
    assert b.requests_a_batch >= COMPANY_AT
    assert queued == [["alone"]] and forwards[-1] == ["alone"]


def test_requests_on_two_copies_of_a_model_in_one_batch_each_run_on_their_own_copy():
    """Serve batches by model id: after a registry change replaced a model's copy, requests still on the old
    copy and new ones on the new copy can share a batch. Each copy gets a model call of its own, so that a
    request finishes on the copy it started on; both copies are held while their call runs."""
    old, new = fake_copy(), fake_copy(path="models/y")
    b = Batcher(ReplicaCounters())
    calls = []

    def answering(copy, label):
        def predict(inputs):
            calls.append((label, list(inputs), copy.in_use))
            return [[(label, 1.0)] for _ in inputs]

        return predict

    old.runtime.predict, new.runtime.predict = answering(old, "old"), answering(new, "new")
    answers = asyncio.run(Batcher.run_batch.__wrapped__(b, [["a"], ["b"], ["c"]], [old, new, old]))
    assert [a["labels"][0, 0] for a in answers] == ["old", "new", "old"]  # each request's one input
    assert calls == [("old", ["a", "c"], 1), ("new", ["b"], 1)]  # one call per copy, each held for it
    assert old.in_use == new.in_use == 0 and b.batches_running == 0


def test_a_failing_batch_fails_only_the_request_at_fault():
    copy = fake_copy()
    b = Batcher(ReplicaCounters())

    def predict(inputs):
        if "bad" in inputs:
            raise ValueError("cannot take 'bad'")
        return [[("ok", 1.0)] for _ in inputs]

    copy.runtime.predict = predict
    answers = asyncio.run(Batcher.run_batch.__wrapped__(b, [["a"], ["bad"], ["c"]], [copy] * 3))
    assert [a["labels"][0, 0] for a in answers if isinstance(a, dict)] == ["ok", "ok"]
    assert isinstance(answers[1], ModelUnavailable) and "ValueError: cannot take 'bad'" in answers[1].message


# -- the memory budget ----------------------------------------------------------------------------------

MB = 1 << 20


class Budget:
    """A MemoryBudget of a fixed size, without measuring this process."""

    def __init__(self, budget):
        from deployments.worker.memory import MemoryBudget

        self.real = MemoryBudget.__new__(MemoryBudget)
        self.real.device, self.real.baseline, self.real.budget = "cpu", 0, budget


def sized_cache(budget: int, **sizes: int) -> tuple[ModelCache, "Owner", FakeCache]:
    """A cache whose registry has models of the given sizes (tests.byo_runtimes:Sized), a budget, and Serve's
    cache of its own (the loads below run under its lock, as Serve runs them)."""
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"]))
    live.apply(
        registry(*[spec(m, runtime="tests.byo_runtimes:Sized", parameters={"size": n}) for m, n in sizes.items()])
    )
    owner = Owner(fake_copy())
    serve_cache = FakeCache()
    setattr(owner, ray_internals._MULTIPLEX_ATTR, serve_cache)
    c = ModelCache(owner, live, ReplicaCounters(), FakeMetrics(), 30.0, memory=Budget(budget).real, memory_wait_s=0.2)
    return c, owner, serve_cache


async def load_as_serve(c: ModelCache, serve_cache: FakeCache, model_id: str) -> ModelCopy:
    """What Serve's multiplexed loader does around ``get_model``: under its lock, then into its cache."""
    async with serve_cache._model_cache_lock:
        copy = await c.load(model_id)
        serve_cache.models[model_id] = copy
        return copy


def test_a_load_over_the_budget_first_evicts_the_least_recent_idle_copies_until_it_fits():
    c, _, serve_cache = sized_cache(500 * MB, a=200 * MB, b=200 * MB, big=250 * MB)

    async def scenario():
        a = await load_as_serve(c, serve_cache, "a")
        b = await load_as_serve(c, serve_cache, "b")
        serve_cache.models.pop("a")  # Serve's LRU made room by count before the load: a is gone
        a.unload()
        big = await load_as_serve(c, serve_cache, "big")  # 200 + 250 fits: b stays
        return a, b, big

    a, b, big = asyncio.run(scenario())
    assert not a.loaded and b.loaded and big.loaded and c._counters.evicted_for_memory == 0
    c2, _, serve_cache2 = sized_cache(400 * MB, a=200 * MB, big=250 * MB)

    async def over():
        a = await load_as_serve(c2, serve_cache2, "a")
        big = await load_as_serve(c2, serve_cache2, "big")  # 200 + 250 > 400: a goes first
        return a, big

    a, big = asyncio.run(over())
    assert not a.loaded and big.loaded and list(serve_cache2.models) == ["big"]
    assert c2._counters.evicted_for_memory == 1 and c2.memory_report().used_bytes == 250 * MB


def test_a_model_larger_than_the_budget_is_refused_with_its_size_and_the_others_stay():
    c, _, serve_cache = sized_cache(300 * MB, small=100 * MB, huge=400 * MB)

    async def scenario():
        small = await load_as_serve(c, serve_cache, "small")
        with pytest.raises(ModelUnavailable, match=f"takes {400 * MB} bytes, more than .* budget .* of {300 * MB}"):
            await load_as_serve(c, serve_cache, "huge")
        return small

    small = asyncio.run(scenario())
    assert small.loaded and list(serve_cache.models) == ["small"] and c._counters.refused_over_budget == 1
    assert c.status["huge"].state is ModelState.FAILED and c.status["huge"].size_bytes == 400 * MB
    c.status["huge"].retry_after = None  # the back-off over: it is refused again before any load, by its size
    with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
        asyncio.run(load_as_serve(c, serve_cache, "huge"))
    assert c._counters.refused_over_budget == 2


def test_copies_that_requests_still_hold_count_until_freed_and_a_load_waits_for_them_then_gives_up():
    """At most the cap plus one copy alive: with two held and one evicted but in use, a fourth waits; freed
    meanwhile, it loads; else it gets a 503 that says why."""
    c, _, serve_cache = sized_cache(10_000 * MB, a=MB, b=MB, c=MB, d=MB)

    async def scenario():
        a = await load_as_serve(c, serve_cache, "a")
        assert a.hold()  # a request runs on a
        serve_cache.models.pop("a")
        a.unload()  # evicted while in use: it lingers
        for m in ("b", "c"):
            (await load_as_serve(c, serve_cache, m)).hold()  # both in use: nothing idle to evict
        with pytest.raises(ModelUnavailable, match=r"does not fit now.* 3 copies that requests still run on"):
            await load_as_serve(c, serve_cache, "d")
        c._memory_wait_s = 60  # now a wait long enough for the release below
        waiting = asyncio.ensure_future(load_as_serve(c, serve_cache, "d"))
        await until(lambda: c._counters.waited_for_memory == 2)
        a.release()  # a's request ends: it is freed, in a thread, and the load goes on
        return await asyncio.wait_for(waiting, 30), a

    d, a = asyncio.run(scenario())
    assert d.loaded and not a.loaded and a.released.is_set()


def test_the_routers_victims_go_first_and_a_victim_other_than_the_lru_one_is_counted():
    c, _, serve_cache = sized_cache(10_000 * MB, a=MB, b=MB, new=MB)

    async def scenario():
        for m in ("a", "b"):
            await load_as_serve(c, serve_cache, m)
        await c.evict_for("new", ("b",))  # a is the least recently used: the router chose b

    asyncio.run(scenario())
    assert list(serve_cache.models) == ["a"] and "b" not in c.held
    counters = c._counters
    assert (counters.evicted_by_router, counters.router_victim_not_lru, counters.evicted_by_lru) == (1, 1, 0)


def test_a_batch_of_one_request_with_idle_threads_runs_on_them_and_a_larger_batch_does_not():
    """The router's idle threads apply to a batch of that request alone, at once or through the queue (at
    most the machine's cores), where the copy measured them faster; a batch of several keeps the replica's
    share; the counters say which ran how."""
    import torch

    copy = fake_copy()
    measured_faster(copy.idle_threads)
    seen = []
    copy.runtime.predict = lambda inputs: (
        seen.append((len(inputs), torch.get_num_threads())) or [[("x", 1.0)]] * len(inputs)
    )
    copy.thread.submit(torch.set_num_threads, 1).result()
    b = Batcher(ReplicaCounters(), threads=1)
    b._cores = 4
    batch = Batcher.run_batch.__wrapped__

    async def scenario():
        await predict(b, copy, ["alone"])  # no hint: the replica's share
        await b.predict(["alone"], copy, idle_threads=2) if copy.hold() else None
        copy.release()
        await batch(b, [["queued"]], [copy], [b._extra(8)])  # through the queue, capped at 4 cores
        await batch(b, [["a"], ["b"]], [copy, copy], [b._extra(2), None])  # two requests: the share

    asyncio.run(scenario())
    assert seen == [(1, 1), (1, 2), (1, 4), (2, 1)]
    assert (b._counters.idle_thread_offers, b._counters.extra_thread_batches, b._counters.most_threads) == (2, 2, 4)
    measured = copy.idle_threads.report()  # the two offered batches, each timed on the way it ran
    assert (measured.lone_batches, measured.on_idle_threads, measured.own_threads_ms) == (8, 5, 10.0)
    assert copy.thread.submit(torch.get_num_threads).result() == 1  # undone after each pass


def measured_faster(rule, on_idle: bool = True) -> None:
    """Give an ``IdleThreadsRule`` its trials, with the idle threads (or, ``on_idle=False``, the own) faster."""
    from deployments.worker.threads import TRIALS

    for _ in range(TRIALS):
        rule.record(True, 0.005 if on_idle else 0.010)
        rule.record(False, 0.010 if on_idle else 0.005)


def test_a_lone_request_keeps_its_own_threads_where_its_model_ran_slower_on_the_idle_ones(monkeypatch):
    """The offer is counted, but a copy that measured its lone batches slower on the node's idle threads
    runs on the replica's own share; each offered batch's time per input is recorded for the copy's rule."""
    import itertools

    import torch

    clock = itertools.count(step=0.002)  # each pass takes 2 ms by the replica's clock: 1 ms an input of two
    monkeypatch.setattr(batching, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    copy = fake_copy()
    measured_faster(copy.idle_threads, on_idle=False)
    seen = []
    copy.runtime.predict = lambda inputs: seen.append(torch.get_num_threads()) or [[("x", 1.0)]] * len(inputs)
    copy.thread.submit(torch.set_num_threads, 1).result()
    b = Batcher(ReplicaCounters(), threads=1)
    b._cores = 2

    async def scenario():
        for _ in range(3):
            await b.predict(["alone", "two inputs"], copy, idle_threads=2) if copy.hold() else None
            copy.release()

    asyncio.run(scenario())
    assert seen == [1, 1, 1]
    assert (b._counters.idle_thread_offers, b._counters.extra_thread_batches, b._counters.most_threads) == (3, 0, 1)
    measured = copy.idle_threads.report()  # the three timed on the own thread: the idle threads' times as they were
    assert (measured.lone_batches, measured.on_idle_threads, measured.idle_threads_ms) == (9, 3, 10.0)
    assert measured.own_threads_ms == 3.0 and measured.uses_idle_threads is False  # the median of 5, 5, 5, 1, 1, 1


# -- what a refused or changed load leaves behind ----------------------------------------------------------


def _sized(model_id: str, size: int):
    return spec(model_id, runtime="tests.byo_runtimes:Sized", parameters={"size": size})


def test_a_load_refused_for_room_after_it_measured_its_copy_leaves_the_model_as_it_was():
    """x's size is not known before it loads; measured, 150 MB does not fit beside a (200 MB, in use) within
    the wait: the request gets its 503, and x is not shown loading (the router would count it there)."""
    c, _, serve_cache = sized_cache(300 * MB, a=200 * MB, x=150 * MB)

    async def scenario():
        a = await load_as_serve(c, serve_cache, "a")
        assert a.hold()  # a request runs on a
        with pytest.raises(ModelUnavailable, match="does not fit now"):
            await load_as_serve(c, serve_cache, "x")
        a.release()

    asyncio.run(scenario())
    assert c.status["x"].state is ModelState.NOT_LOADED


def test_a_changed_model_is_not_refused_by_the_size_its_old_files_measured():
    c, _, serve_cache = sized_cache(300 * MB, m=400 * MB)

    async def scenario():
        with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
            await load_as_serve(c, serve_cache, "m")  # its old files: 400 MB
        await c.apply(c._live.apply(registry(_sized("m", 100 * MB))))  # the operator points it at new files
        assert c.status["m"].state is ModelState.NOT_LOADED and c.status["m"].size_bytes is None
        return await load_as_serve(c, serve_cache, "m")

    assert asyncio.run(scenario()).loaded


def test_a_model_known_to_be_larger_than_the_budget_is_refused_before_serves_lru_makes_room_for_it():
    """After its back-off, a request for a model measured larger than the whole budget is refused at once
    (and the back-off starts again): Serve's LRU does not evict a healthy model by count for a load that the
    replica would refuse."""
    c, owner, _ = sized_cache(300 * MB, a=100 * MB, b=100 * MB, huge=400 * MB)

    async def scenario():
        w = serve_wrapper(owner, c.load)
        with pytest.raises(ModelUnavailable):
            await c.acquire("huge")  # its size not known yet: loaded, measured, refused
        for m in ("a", "b"):
            (await c.acquire(m)).release()
        c.status["huge"].retry_after = None  # the back-off is over
        before = list(w.models)
        with pytest.raises(ModelUnavailable, match="more than this replica's memory budget"):
            await c.acquire("huge")
        return before, list(w.models)

    before, after = asyncio.run(scenario())
    assert before == after == ["a", "b"] and c.status["huge"].retry_after is not None


def serve_wrapper(owner, loader, n: int = 2):
    """Ray's own ``@serve.multiplexed`` cache (its LRU, making room by count), without its replica context and
    metrics, around ``loader``."""
    from collections import OrderedDict

    from ray.serve.multiplex import _ModelMultiplexWrapper

    w = _ModelMultiplexWrapper.__new__(_ModelMultiplexWrapper)
    w.models, w._func, w.self_arg, w.max_num_models_per_replica = OrderedDict(), loader, None, n
    w._model_cache_lock, w._model_load_tasks, w._push_multiplexed_replica_info = asyncio.Lock(), set(), False
    quiet = SimpleNamespace(inc=lambda *a, **k: None, set=lambda *a, **k: None, observe=lambda *a, **k: None)
    for gauge in (
        "model_load_latency_ms",
        "model_unload_latency_ms",
        "num_models_gauge",
        "registered_model_gauge",
        "get_model_requests_counter",
        "models_unload_counter",
        "models_load_counter",
    ):
        setattr(w, gauge, quiet)
    setattr(owner, ray_internals._MULTIPLEX_ATTR, w)
    owner.get_model = w.load_model
    return w


def test_the_routers_victims_stay_for_a_request_whose_model_is_in_its_back_off(monkeypatch):
    from deployments.worker import deployment
    from serve_app.core.schemas import RouteHint

    c, owner = cached()
    c._live.apply(registry(spec(), spec("x", path="models/y")))  # x registered, in its back-off below
    status = c.model_status("x")
    status.retry_after, status.last_error = time.time() + 30, "OSError: gone"
    w = worker_of(c)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "x")
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="here"))
    monkeypatch.setattr(deployment.serve, "get_replica_context", lambda: context)
    with pytest.raises(ModelUnavailable, match="not tried again"):
        asyncio.run(w.predict(["hi"], route=RouteHint(replica_id="here", evict=("m",))))
    assert "m" in getattr(owner, ray_internals._MULTIPLEX_ATTR).models


def test_a_revived_copy_evicted_later_by_serves_lru_is_counted_as_the_lrus():
    c, owner = cached()
    serve_cache = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        copy = owner.copy
        assert copy.hold()
        assert await c.evict("m", cause="router")  # in use: it lingers
        serve_cache.models["m"] = await c.load("m")  # a new request takes it back
        copy.release()
        serve_cache.models.pop("m")  # Serve's LRU, making room by count
        copy.__del__()

    asyncio.run(scenario())
    assert (c._counters.revived, c._counters.evicted_by_lru) == (1, 1)


def test_a_victim_serves_lru_took_first_is_not_counted_as_the_routers_too():
    """The router's victims wait for a load under way (their copies serve hits meanwhile)."""
    c, owner = cached()
    serve_cache = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        async with serve_cache._model_cache_lock:  # a load under way, under Serve's cache lock
            task = asyncio.ensure_future(c.evict_for("new", ("m",)))
            await asyncio.sleep(0.05)
            assert "m" in serve_cache.models and owner.copy.loaded  # still serving
            serve_cache.models.pop("m")  # Serve's LRU takes m meanwhile
            owner.copy.__del__()
        await task

    asyncio.run(scenario())
    assert (c._counters.evicted_by_router, c._counters.evicted_by_lru) == (0, 1)


def test_an_unload_and_a_registry_change_do_not_wait_for_a_load_that_holds_serves_cache_lock():
    """A load holds the lock for as long as it runs, one that hangs for as long as it hangs: an explicit unload
    and a registry change take their model out at once."""
    c, owner = cached()
    serve_cache = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        async with serve_cache._model_cache_lock:  # a load under way, under Serve's cache lock
            assert await asyncio.wait_for(c.evict("m"), 5) and not owner.copy.loaded
            serve_cache.models["m"] = owner.copy = fake_copy()
            c._hold("m", owner.copy)
            await asyncio.wait_for(c.apply(c._live.apply(registry(spec("o")))), 5)  # m removed
            assert serve_cache.models == {} and not owner.copy.loaded

    asyncio.run(scenario())


def test_a_model_removed_while_a_request_ran_on_it_does_not_come_back_in_the_report():
    c, owner = cached()

    async def scenario():
        assert owner.copy.hold()  # a request runs on m
        await c.apply(c._live.apply(registry(spec("o"))))  # m removed
        c.used("m")  # its request is answered
        c.request_failed("m", "boom")
        owner.copy.release()

    asyncio.run(scenario())
    assert "m" not in c.report()


def test_the_replicas_report_runs_on_its_event_loop_where_the_cache_changes():
    """Serve runs a plain method on a thread of its pool: the report would read the cache's dicts while the
    event loop changes them. Coroutines run on the loop, between two steps of the requests."""
    import inspect

    from deployments.worker.deployment import ModelWorker

    worker = ModelWorker.func_or_class
    assert inspect.iscoroutinefunction(worker.record_routing_stats) and inspect.iscoroutinefunction(worker.status)


# -- a load that hangs ----------------------------------------------------------------------------------


def gated_cache(
    gate, load_timeout_s: float = 0.3, backoff_s: float = 0.0, budget: int | None = None, stuck_size: int = 10
) -> tuple[ModelCache, Owner]:
    """A cache over Ray's own multiplexed wrapper whose registry has 'stuck' (tests.byo_runtimes:Sized, its
    load waiting until the file ``gate`` exists) and 'a' and 'b', which load at once."""
    live = LiveRegistry(TaskCatalog.load(runtime_modules=["tests.byo_runtimes"]))
    sized = {"runtime": "tests.byo_runtimes:Sized"}
    live.apply(
        registry(
            spec("stuck", **sized, parameters={"size": stuck_size, "load_gate": str(gate)}),
            *[spec(m, **sized, parameters={"size": 10}) for m in ("a", "b")],
        )
    )
    owner = Owner(fake_copy())
    memory = Budget(budget).real if budget is not None else None
    c = ModelCache(
        owner, live, ReplicaCounters(), FakeMetrics(), backoff_s, memory=memory, load_timeout_s=load_timeout_s
    )
    serve_wrapper(owner, c.load)
    return c, owner


def test_a_load_past_its_timeout_fails_and_the_replicas_other_models_load_meanwhile(tmp_path):
    gate = tmp_path / "gate"
    c, owner = gated_cache(gate)
    w = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        with pytest.raises(ModelUnavailable, match=r"did not finish within 0.3s \(worker.load_timeout_s\)"):
            await asyncio.wait_for(c.acquire("stuck"), 10)  # the gate stays shut: without the timeout, a hang
        assert c.status["stuck"].state is ModelState.FAILED and "stuck" in c.abandoned
        (await asyncio.wait_for(c.acquire("a"), 5)).release()  # Serve's cache lock is free again
        with pytest.raises(ModelUnavailable, match="still running"):  # no second thread for the same files
            await c.acquire("stuck")
        stuck = c.abandoned["stuck"]
        gate.touch()  # the load returns at last: its copy is freed
        await until(lambda: "stuck" not in c.abandoned and stuck.released.is_set())
        copy = await c.acquire("stuck")  # the back-off (0 s here) is over: loaded again, now at once
        copy.release()
        return stuck, copy

    stuck, copy = asyncio.run(scenario())
    assert not stuck.loaded and copy.loaded and copy is not stuck
    assert list(w.models) == ["a", "stuck"] and c._counters.load_timeouts == 1


def test_a_registry_change_does_not_wait_for_a_load_under_way_and_a_model_removed_meanwhile_is_not_kept(tmp_path):
    gate = tmp_path / "gate"
    c, owner = gated_cache(gate, load_timeout_s=30)
    w = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        (await c.acquire("a")).release()
        loading = asyncio.ensure_future(c.acquire("stuck"))
        await until(lambda: c.status.get("stuck") and c.status["stuck"].state is ModelState.LOADING)
        change = c._live.apply(registry(spec("b", runtime="tests.byo_runtimes:Sized", parameters={"size": 10})))
        await asyncio.wait_for(c.apply(change), 5)  # a and stuck removed, while stuck's load holds the lock
        assert "a" not in w.models
        gate.touch()
        with pytest.raises(ModelNotFound):
            await loading
        return list(w.models)

    assert asyncio.run(scenario()) == [] and not [copy for copy in c.copies if copy.loaded]


SIZED = {"runtime": "tests.byo_runtimes:Sized"}


def test_a_load_whose_entry_changed_while_it_hung_loads_the_new_files_without_a_back_off(tmp_path):
    """The operator's fix for a model whose load hangs: its entry pointed at other files. The request waiting on
    the old load gets the new files' copy; the old files' timeout puts nothing in the back-off."""
    gate = tmp_path / "gate"
    c, _ = gated_cache(gate, load_timeout_s=0.5, backoff_s=30)

    async def scenario():
        loading = asyncio.ensure_future(c.acquire("stuck"))
        await until(lambda: c.status.get("stuck") and c.status["stuck"].state is ModelState.LOADING)
        fixed = registry(spec("stuck", **SIZED, parameters={"size": 20}), spec("a", **SIZED, parameters={"size": 10}))
        await c.apply(c._live.apply(fixed))
        copy = await asyncio.wait_for(loading, 10)
        copy.release()
        return copy

    try:
        copy = asyncio.run(scenario())
    finally:
        gate.touch()
    status = c.status["stuck"]
    assert copy.spec.parameters == {"size": 20} and status.state is ModelState.LOADED
    assert status.retry_after is None and status.load_failures == 0 and c._counters.load_timeouts == 1


def test_a_model_removed_while_its_load_made_room_is_not_kept(tmp_path):
    c, owner = gated_cache(tmp_path / "gate", load_timeout_s=30)
    (tmp_path / "gate").touch()
    w = getattr(owner, ray_internals._MULTIPLEX_ATTR)
    make_room, calls = c._make_room, []

    async def making_room_meanwhile(model_id, size):  # the second, after the load: a registry change meanwhile
        calls.append(model_id)
        if len(calls) == 2:
            await c.apply(c._live.apply(registry(spec("b", **SIZED, parameters={"size": 10}))))
        await make_room(model_id, size)

    c._make_room = making_room_meanwhile

    async def scenario():
        with pytest.raises(ModelNotFound):
            await c.acquire("a")

    asyncio.run(scenario())
    assert list(w.models) == [] and c.held == set() and "a" not in c.status
    assert not [copy for copy in c.copies if copy.loaded]


def test_while_a_timed_out_load_runs_its_model_is_refused_before_anything_is_evicted_and_its_bytes_count(tmp_path):
    gate = tmp_path / "gate"
    c, owner = gated_cache(gate, load_timeout_s=0.3, backoff_s=0)
    w = getattr(owner, ray_internals._MULTIPLEX_ATTR)
    c._live.apply(  # stuck declares its size: what its timed-out copy counts for
        registry(
            spec("stuck", **SIZED, parameters={"size": 10, "load_gate": str(gate)}, memory_bytes=5000),
            *[spec(m, **SIZED, parameters={"size": 10}) for m in ("a", "b")],
        )
    )

    async def scenario():
        for m in ("a", "b"):
            (await c.acquire(m)).release()
        with pytest.raises(ModelUnavailable, match="did not finish within"):
            await c.acquire("stuck")  # Serve's LRU made room by count for this one: a went
        (await c.acquire("a")).release()
        before, used = list(w.models), c.memory_report().used_bytes
        held = sum(w.models[m].size_bytes for m in before)
        with pytest.raises(ModelUnavailable, match="still running"):
            await c.acquire("stuck")
        return before, list(w.models), used - held

    try:
        before, after, used = asyncio.run(scenario())
    finally:
        gate.touch()
    assert before == after == ["b", "a"] and c.status["stuck"].load_failures == 1
    assert used == 5000  # the timed-out copy counts for its declared bytes until its load returns


def test_a_load_that_raises_stopiteration_is_a_failed_load_not_a_hang():
    from concurrent.futures import ThreadPoolExecutor

    from deployments.worker.cache import on_thread

    def load():
        return next(iter([]))

    async def scenario():
        return await asyncio.wait_for(on_thread(ThreadPoolExecutor(1), load), 5)

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(scenario())


def test_a_load_whose_entry_changed_meanwhile_is_not_judged_by_its_old_files_size(tmp_path):
    """Its old files turn out larger than the whole budget: the entry, which now names files that fit, is
    loaded from them, and no failure of the old ones is recorded against it."""
    gate = tmp_path / "gate"
    c, _ = gated_cache(gate, load_timeout_s=30, backoff_s=30, budget=1000, stuck_size=5000)

    async def scenario():
        loading = asyncio.ensure_future(c.acquire("stuck"))
        await until(lambda: c.status.get("stuck") and c.status["stuck"].state is ModelState.LOADING)
        fixed = registry(spec("stuck", **SIZED, parameters={"size": 20, "load_gate": str(gate)}))
        await c.apply(c._live.apply(fixed))
        gate.touch()
        copy = await asyncio.wait_for(loading, 10)
        copy.release()
        return copy

    copy = asyncio.run(scenario())
    status = c.status["stuck"]
    assert copy.spec.parameters["size"] == 20 and status.state is ModelState.LOADED
    assert status.load_failures == 0 and status.retry_after is None and c._counters.refused_over_budget == 0


def test_loads_that_timed_out_and_still_run_do_not_take_the_replicas_copies_from_its_other_models(tmp_path):
    """A hostile review: three of them filled the count of live copies, and every load after waited out the
    memory wait under Serve's lock, then failed. They count for their bytes, and are in no cache to evict."""
    gate = tmp_path / "gate"
    c, owner = gated_cache(gate, load_timeout_s=0.2)
    stuck = [spec(f"stuck{k}", **SIZED, parameters={"size": 10, "load_gate": str(gate)}) for k in range(3)]
    c._live.apply(registry(*stuck, *[spec(m, **SIZED, parameters={"size": 10}) for m in ("a", "b")]))
    w = getattr(owner, ray_internals._MULTIPLEX_ATTR)

    async def scenario():
        for k in range(3):
            with pytest.raises(ModelUnavailable, match="did not finish within"):
                await c.acquire(f"stuck{k}")
        for m in ("a", "b"):
            (await asyncio.wait_for(c.acquire(m), 5)).release()
        return list(w.models)

    try:
        assert asyncio.run(scenario()) == ["a", "b"] and len(c.abandoned) == 3
    finally:
        gate.touch()
