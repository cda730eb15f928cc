"""The model-worker deployment: loads registry models on demand and runs them.

Each replica holds at most ``MAX_MODELS_PER_REPLICA`` models. Ray Serve's model multiplexing loads a
request's model (the ``multiplexed_model_id`` set by the ingress) on a miss and unloads the least
recently used model when the replica is full; the runtime's ``__del__`` then drops the weights.

Each replica keeps the status of the models it has seen (state, loads, times, last error) and answers
``record_routing_stats`` with it: Serve's controller polls that method, and the ingress asks every replica
for ``GET /models``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from deployments.runtimes import ModelRuntime, runtime_for
from serve_app.core import ray_internals
from serve_app.core.config import BatchingArgs
from serve_app.core.errors import ModelUnavailable, ServeAppError
from serve_app.core.metrics import WorkerMetrics
from serve_app.core.registry import Registry
from serve_app.core.schemas import ModelState, ReplicaModelStatus, Scores, WorkerResult

logger = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 2


def configure_torch(num_threads: int | None) -> None:
    """Import torch and transformers at replica start, not on the first request, and size torch's thread pool."""
    import torch
    import transformers.pipelines  # noqa: F401  (heavy; imported once here)

    if num_threads:
        torch.set_num_threads(num_threads)
    logger.info(
        "torch %s on %s with %d threads",
        torch.__version__,
        "cuda" if torch.cuda.is_available() else "cpu",
        torch.get_num_threads(),
    )


@serve.deployment
class ModelWorker:
    async def __init__(
        self, registry: Registry, torch_threads: int | None = None, batching: BatchingArgs | None = None
    ) -> None:
        configure_torch(torch_threads)
        batching = batching or BatchingArgs()
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._registry = registry
        self._status: dict[str, ReplicaModelStatus] = {}
        self._held: set[str] = set()  # the models Serve's LRU cache holds loaded on this replica
        self._metrics = WorkerMetrics()
        for spec in [m for m in registry.models if m.preload][:MAX_MODELS_PER_REPLICA]:
            try:
                await self.get_model(spec.id)
            except ServeAppError as e:  # a broken preload must not keep the replica from starting
                logger.error("preloading %r failed: %s", spec.id, e.message)

    def _model_status(self, model_id: str) -> ReplicaModelStatus:
        return self._status.setdefault(model_id, ReplicaModelStatus())

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ModelRuntime:
        spec = self._registry.get(model_id)
        status = self._model_status(model_id)
        status.state = ModelState.LOADING
        runtime = runtime_for(spec)
        try:
            # Loading reads files and builds tensors: keep it off the event loop.
            await asyncio.to_thread(runtime.load)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            logger.error("loading model %r failed: %s", model_id, reason)
            status.state = ModelState.FAILED
            status.last_error, status.last_error_at = reason, time.time()
            self._metrics.load_failed(model_id)
            raise ModelUnavailable(f"Model {model_id!r} could not be loaded: {reason}", model_id=model_id) from None
        status.state = ModelState.LOADED
        status.load_count += 1
        status.last_loaded_at = time.time()
        status.last_load_seconds = runtime.load_seconds
        self._metrics.loaded(model_id, runtime.load_seconds or 0.0)
        self._held.add(model_id)
        runtime.on_unload = lambda: self._unloaded(model_id)
        return runtime

    def _unloaded(self, model_id: str) -> None:
        self._held.discard(model_id)
        status = self._model_status(model_id)
        status.state = ModelState.NOT_LOADED
        status.unload_count += 1
        self._metrics.unloaded(model_id)

    async def predict(self, inputs: list[Any]) -> WorkerResult:
        """Answer one request's inputs; concurrent requests for the same model are batched together."""
        model_id = serve.get_multiplexed_model_id()
        if model_id in self._held:
            self._metrics.cache_hit(model_id)
        # Load (or find) the model before joining the batch queue, so that a cold load does not hold up the
        # batch queue, and hold it (no await in between), so that an LRU eviction cannot free it meanwhile.
        runtime = await self.get_model(model_id)
        with runtime.in_use():
            if type(runtime).prepare is not ModelRuntime.prepare:  # e.g. decoding images: CPU work, in a thread
                inputs = await asyncio.to_thread(runtime.prepare, inputs)
            predictions = await self._run_batch(inputs, runtime)
        if isinstance(predictions, Exception):
            raise predictions
        self._model_status(model_id).last_used_at = time.time()
        return WorkerResult(predictions=predictions)

    # Size and wait are set from BatchingArgs in __init__. One batch at a time: a replica runs its models
    # on one torch thread, so a second concurrent batch would add no compute.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _run_batch(
        self, requests: list[list[Any]], runtimes: list[ModelRuntime]
    ) -> list[list[Scores] | Exception]:
        """One model call for the inputs of several requests; Serve never mixes models in a batch.
        If the call fails, each request is run alone, so that only the request at fault gets the error."""
        runtime = runtimes[0]  # every request of the batch holds its runtime (in_use), so this one stays loaded
        flat = [item for inputs in requests for item in inputs]
        try:
            predictions = await self._infer(runtime, flat)
        except Exception as e:
            if len(requests) == 1:
                return [e]
            return [await self._infer_or_error(runtime, inputs) for inputs in requests]
        out, start = [], 0
        for inputs in requests:
            out.append(predictions[start : start + len(inputs)])
            start += len(inputs)
        return out

    async def _infer(self, runtime: ModelRuntime, inputs: list[Any]) -> list[Scores]:
        try:
            # The model runs in a worker thread: the replica's event loop stays free.
            return await asyncio.to_thread(runtime.predict, inputs)
        except ServeAppError:
            raise
        except Exception as e:
            logger.exception("model %r failed on a request", runtime.spec.id)
            raise ModelUnavailable(
                f"Model {runtime.spec.id!r} failed on this input: {type(e).__name__}: {e}", model_id=runtime.spec.id
            ) from None

    async def _infer_or_error(self, runtime: ModelRuntime, inputs: list[Any]) -> list[Scores] | Exception:
        try:
            return await self._infer(runtime, inputs)
        except Exception as e:
            return e

    async def load(self) -> None:
        """Load the request's model on this replica (the LRU cap still applies)."""
        await self.get_model(serve.get_multiplexed_model_id())

    async def unload(self) -> bool:
        """Unload the request's model from this replica; False if it did not hold it."""
        model_id = serve.get_multiplexed_model_id()

        def evicted(runtime: ModelRuntime) -> None:  # under Serve's cache lock: a reload is recorded after it
            runtime.on_unload = None
            self._unloaded(model_id)

        runtime = await ray_internals.evict_multiplexed_model(self, model_id, evicted)
        if runtime is None:
            return False
        await asyncio.to_thread(runtime.unload)
        return True

    def record_routing_stats(self) -> dict[str, Any]:
        """This replica's view of its models; polled by Serve's controller and read by the ingress."""
        return {"models": {model_id: s.model_dump(mode="json") for model_id, s in self._status.items()}}
