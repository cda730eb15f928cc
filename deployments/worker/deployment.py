"""The model-worker deployment: loads registry models on demand and runs them.

Each replica holds at most ``MAX_MODELS_PER_REPLICA`` models. Ray Serve's model multiplexing loads a
request's model (the ``multiplexed_model_id`` set by the ingress) on a miss and unloads the least recently
used model when the replica is full. This class is the seam to Serve; the work is in three parts that each
read alone:

* ``cache.ModelCache``: the models this replica holds, their status, loads, evictions, back-off, and the
  registry's changes (``copies.ModelCopy`` is one loaded copy: its runtime, size, holds and free);
* ``batching.Batcher``: dynamic batching per model and the lone request that skips the queue;
* this deployment: Serve's entry points (``predict``, ``load``, ``unload``, ``status``), the registry
  (Serve's ``user_config``, applied in ``reconfigure`` while the replica runs:
  ``serve_app.core.live_registry``), and the report Serve's controller polls (``record_routing_stats``),
  which the routers and ``GET /models`` read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.worker.batching import Batcher, model_failure
from deployments.worker.cache import MAX_MODELS_PER_REPLICA, ModelCache
from deployments.worker.copies import ModelCopy, one_per_input
from deployments.worker.memory import MemoryBudget
from serve_app.core import logs
from serve_app.core.config import RegistryRules, WorkerArgs
from serve_app.core.errors import ModelChanged, ModelFailed
from serve_app.core.live_registry import LiveRegistry
from serve_app.core.metrics import WorkerMetrics
from serve_app.core.outputs import ContractError
from serve_app.core.schemas import ReplicaCounters, RouteHint, WorkerResult

logger = logging.getLogger("ray.serve")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
        self,
        args: WorkerArgs | None = None,
        rules: RegistryRules | None = None,
        request_timeout_s: float = 60.0,
    ) -> None:
        args = args or WorkerArgs()
        configure_torch(args.torch_threads)
        logs.in_replica()
        memory = MemoryBudget(args.memory_bytes, args.gpu_memory_bytes)  # measures the baseline: after the imports
        # The registry is set by reconfigure, which Serve calls before the replica takes requests.
        self._live = LiveRegistry.from_rules(rules)
        self._counters = ReplicaCounters()
        self._cache = ModelCache(
            self,
            self._live,
            self._counters,
            WorkerMetrics(),
            args.load_failure_backoff_s,
            memory=memory,
            memory_wait_s=request_timeout_s,
            load_timeout_s=args.load_timeout_s,
        )
        self._threads = args.torch_threads or torch_threads()
        self._reports = itertools.count(1)  # each report's number: which of two reports is the later
        self._batcher = Batcher(self._counters, args.batching, self._threads)
        # Requests' inputs (images) are decoded on these threads only: a flood of costly images waits its turn
        # here instead of taking a thread, and a core, each (a cancelled request's decode not yet started is
        # dropped; one running finishes on its thread).
        self._decoders = ThreadPoolExecutor(max_workers=args.max_concurrent_decodes, thread_name_prefix="decode")
        self._decoding, self._decoding_lock = 0, threading.Lock()

    # -- the registry ---------------------------------------------------------------------------------

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Apply the registry in ``user_config`` (Serve calls this at start and on every change of it).
        A bad one is refused and this replica keeps its registry; while starting it has none to keep, and
        the error stops the start. (``rank`` is unused: asking for it makes Serve call this at start even
        when the deployment has no user_config, so that a replica without a registry does not start.)"""
        first = not self._live.ready
        change = await self._live.apply_checked_off_loop(user_config)
        if change is None:
            return
        await self._cache.apply(change)
        if first:
            await self._cache.preload()

    # -- the model cache ----------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ModelCopy:
        """Serve's LRU calls this on a miss, after it has made room."""
        return await self._cache.load(model_id)

    # -- predictions --------------------------------------------------------------------------------

    async def predict(
        self,
        inputs: list[Any],
        task: str | None = None,
        registry_version: str | None = None,
        declared_bytes: int | None = None,
        route: RouteHint | None = None,
        parameters: dict[str, Any] | None = None,
        registry_applied_at: float | None = None,
    ) -> WorkerResult:
        """Answer one request's inputs; concurrent requests for the same model are batched together.
        ``task`` and ``registry_version``: what the ingress decoded the inputs for, under which registry (which
        the ingress applied at ``registry_applied_at``);
        ``declared_bytes`` is for the router; ``route``: what the router tells this replica (RouteHint);
        ``parameters``: the request's parameters for its task, checked by the ingress."""
        model_id = serve.get_multiplexed_model_id()
        self._counters.requests += 1
        start = time.perf_counter()
        try:
            await self._cache.catch_up(model_id, registry_version, registry_applied_at)
            loaded = model_id not in self._cache.held
            self._cache.refuse_early(model_id)  # before the router's victims go for it
            route = await self._routed(model_id, route)
            # Load (or find) and hold the model before joining the batch queue, so that a cold load does not
            # hold up the queue and an eviction cannot free the model while the request needs it.
            copy = await self._cache.acquire(model_id)
            try:
                if task is not None and copy.spec.task != task:
                    raise ModelChanged(
                        f"Model {model_id!r} is a {copy.spec.task} model now, no longer {task}: "
                        "the registry changed while the request was on its way; send it again",
                        model_id=model_id,
                    )
                if copy.prepares:  # e.g. decoding images: on the decode threads
                    inputs = await asyncio.get_running_loop().run_in_executor(
                        self._decoders, self._prepare, copy, inputs
                    )
                answer = await self._batcher.predict(inputs, copy, route.threads if route else None, parameters)
            except ModelFailed as e:  # its prepare failed
                answer = e
            finally:
                copy.release()
        except asyncio.CancelledError:
            self._counters.requests_cancelled += 1
            raise
        finally:
            self._counters.predict_seconds += time.perf_counter() - start
        if isinstance(answer, Exception):
            if isinstance(answer, ModelFailed):
                self._cache.request_failed(model_id, answer.message)
            raise answer
        self._cache.used(model_id)
        return WorkerResult(outputs=answer, loaded=loaded)

    def _prepare(self, copy: ModelCopy, inputs: list[Any]) -> list[Any]:
        """A request's inputs as its model takes them (on a decode thread), counting the decodes at once."""
        with self._decoding_lock:
            self._decoding += 1
            self._counters.most_decodes_at_once = max(self._counters.most_decodes_at_once, self._decoding)
        try:
            prepared = copy.prepare(inputs)
        except Exception as e:
            raise model_failure(copy, e, "failed to prepare this input") from None
        finally:
            with self._decoding_lock:
                self._decoding -= 1
        try:
            return one_per_input(prepared, len(inputs), "prepare must answer one item per input")
        except ContractError as e:
            raise model_failure(copy, e) from None

    # -- explicit load and unload -------------------------------------------------------------------

    async def load(
        self,
        registry_version: str | None = None,
        declared_bytes: int | None = None,
        route: RouteHint | None = None,
        registry_applied_at: float | None = None,
    ) -> None:
        """Load the request's model on this replica (the LRU cap and the memory budget still apply)."""
        model_id = serve.get_multiplexed_model_id()
        await self._cache.catch_up(model_id, registry_version, registry_applied_at)
        self._cache.refuse_early(model_id)
        await self._routed(model_id, route)
        (await self._cache.acquire(model_id, predicting=False)).release()

    async def _routed(self, model_id: str, route: RouteHint | None) -> RouteHint | None:
        """Act on the router's hint for a request of this replica's: for a miss, evict the copies it chose
        (before Serve's LRU would take the least recent), and expect the size it knows. Returns the hint if
        it is this replica's (a hint for another is ignored)."""
        if route is None or route.replica_id != serve.get_replica_context().replica_id.unique_id:
            return None
        self._cache.expect(model_id, route)
        if route.evict:
            await self._cache.evict_for(model_id, route.evict)
        return route

    async def unload(self, on_replica: str | None = None) -> bool:
        """Unload the request's model from this replica; False if it did not hold it. ``on_replica`` names
        the replica the call is for (the router sends it there and nowhere else; one that arrives elsewhere
        unloads nothing)."""
        if on_replica is not None and on_replica != serve.get_replica_context().replica_id.unique_id:
            return False
        return await self._cache.evict(serve.get_multiplexed_model_id(), cause="explicit")

    # -- status -------------------------------------------------------------------------------------

    async def status(self, on_replica: str | None = None) -> dict[str, Any]:
        """This replica's id and view of its models, now (``on_replica``: as for unload)."""
        return {"replica_id": serve.get_replica_context().replica_id.unique_id, **self._report()}

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's view of its models and its counters (a ``ReplicaStatus`` without its ids); Serve's
        controller polls it every routing.stats_period_s and hands it to the routers, from which the
        ingress reads it too. A coroutine, as ``status`` is: Serve runs a plain method on a thread of its
        pool, where the report would read the cache's dicts while the event loop changes them (seen: "dictionary
        changed size during iteration"); on the event loop it reads them between two steps of the requests."""
        return self._report()

    def _report(self) -> dict[str, Any]:
        report = {
            "slots": MAX_MODELS_PER_REPLICA,
            "threads": self._threads,
            "memory": self._cache.memory_report().model_dump(mode="json"),
            "models": self._cache.report(),
            "counters": self._counters.model_dump(mode="json"),
            "registry": self._live.status().model_dump(mode="json"),
        }
        report["report"] = next(self._reports)  # numbered once read: a later number, a later state
        report["at"] = time.time()
        return report
