"""The worker's hold on its models, without Ray: a cancelled request never cancels the load it started,
and a model taken by a request is held until the request lets it go."""

import asyncio
import time

import pytest

from deployments.runtimes.base import ModelRuntime
from deployments.worker.deployment import ModelWorker
from serve_app.core.errors import ModelUnavailable
from serve_app.core.registry import ModelSpec, Task
from serve_app.core.schemas import ReplicaCounters, ReplicaModelStatus


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
