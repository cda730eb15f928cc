"""The model-worker deployment: loads registry models on demand and runs them.

Each replica holds at most ``MAX_MODELS_PER_REPLICA`` models. Ray Serve's model multiplexing loads a
request's model (the ``multiplexed_model_id`` set by the ingress) on a miss and unloads the least
recently used model when the replica is full; the runtime's ``__del__`` then drops the weights.

Around that cache this replica keeps its promises under failure:

* a load is never cancelled with the request that started it (a timeout or a client that leaves), so
  its status never stays "loading" and a second request never starts a second load of the same model;
* a model evicted while requests still hold it is freed when they are done, and taken back, not
  loaded again, if a new request wants it meanwhile: at most one copy of a model per replica;
* a failed load is remembered for ``load_failure_backoff_s``: requests meanwhile get a 503 at once,
  without evicting a healthy model to make room for a load that would fail again.

The registry arrives as Serve's ``user_config`` and changes while the replica runs (``reconfigure``,
with ``serve_app.core.live_registry``): a model added is served from the next request; a model whose
source or task changed, or that was removed, leaves the cache at once, and its weights are freed when the
requests running on it are done (a changed model's next request loads the new files; a removed one's
is a 404). Other models stay loaded, with their status and counters. A bad registry is refused whole: the
replica keeps the one it has.

Each replica keeps the status of the models it has seen, its own counters and its registry's version, and
answers ``record_routing_stats`` with them: Serve's controller polls that method, and the ingress asks
every replica for ``GET /models``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from ray import serve

from deployments.runtimes import ModelRuntime, runtime_for
from serve_app.core import logs, ray_internals
from serve_app.core.config import BatchingArgs
from serve_app.core.errors import ModelChanged, ModelUnavailable, ServeAppError
from serve_app.core.live_registry import LiveRegistry, RegistryChange, same_model
from serve_app.core.metrics import WorkerMetrics
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.registry import ModelSpec
from serve_app.core.schemas import ModelState, ReplicaCounters, ReplicaModelStatus, Scores, WorkerResult

logger = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 2
COMPANY_AT = 1.5
"""Requests per batch, on average over a replica's last several batches, from which a request that finds the
replica idle still waits in Serve's batch queue for company (below it, it runs at once: ModelWorker._predict)."""
BATCH_SIZE_WEIGHT = 0.2
"""The weight of the newest batch in that average (an exponential moving average: from a steady 3 requests a
batch, about 7 batches of one bring it under COMPANY_AT)."""
RELOAD_WAIT_S = 5.0
"""How long a request sent under a registry this replica has not applied yet (the ingress applied it
first) waits for it: a model just added is then found, a changed one loaded from its new files."""


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


def redact_paths(text: str, spec: ModelSpec) -> str:
    """An error message without the server's absolute paths: the model's files as the registry names them
    when that is a relative path, else as the model's files."""
    resolved, _ = spec.source.reference()
    named = spec.source.describe()
    shown = named if not named.startswith("/") else f"<files of model {spec.id!r}>"
    return text.replace(resolved, shown).replace(f"{PROJECT_ROOT}/", "")


@serve.deployment
class ModelWorker:
    async def __init__(
        self,
        torch_threads: int | None = None,
        batching: BatchingArgs | None = None,
        load_failure_backoff_s: float = 30.0,
    ) -> None:
        configure_torch(torch_threads)
        logs.flush_every(1.0)
        batching = batching or BatchingArgs()
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._live = LiveRegistry()  # set by reconfigure, which Serve calls before the replica takes requests
        self._backoff_s = load_failure_backoff_s
        self._status: dict[str, ReplicaModelStatus] = {}
        self._held: set[str] = set()  # the models Serve's LRU cache holds loaded on this replica
        self._lingering: dict[str, ModelRuntime] = {}  # evicted while in use, not freed yet
        self._runtimes: weakref.WeakSet[ModelRuntime] = weakref.WeakSet()  # every runtime still alive
        self._counters = ReplicaCounters()
        self._metrics = WorkerMetrics()
        self._init_batching()

    def _init_batching(self) -> None:
        self._batches_running = 0
        self._no_batch_running = asyncio.Event()
        self._no_batch_running.set()
        self._predicting = 0  # requests with their inputs ready, waiting for their predictions
        self._requests_a_batch = 1.0  # requests per batch over this replica's last several (moving average)
        self._lone_batches: set[asyncio.Future] = set()  # batches of one running for requests that may leave

    # -- the registry ---------------------------------------------------------------------------------

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Apply the registry in ``user_config`` (Serve calls this at start and on every change of it).
        A bad one is refused and this replica keeps its registry; while starting it has none to keep, and
        the error stops the start. (``rank`` is unused: asking for it makes Serve call this at start even
        when the deployment has no user_config, so that a replica without a registry does not start.)"""
        first = not self._live.ready
        change = self._live.apply(user_config)
        if change is None:
            return
        await self._drop(change)
        if first:
            await self._preload()

    async def _preload(self) -> None:
        for spec in [m for m in self._live.registry.models if m.preload]:  # in order, until the replica is full
            if len(self._held) == MAX_MODELS_PER_REPLICA:
                break
            try:
                await self.get_model(spec.id)
            except ServeAppError as e:  # a broken preload must not keep the replica from starting
                logger.error("preloading %r failed: %s", spec.id, e.message)

    async def _drop(self, change: RegistryChange) -> None:
        """Take the models a registry change made stale out of the cache: changed ones (the next request
        loads the new files) and removed ones. Requests running on a copy finish on it; it is freed after."""
        for model_id in change.stale:
            await self._evict(model_id)
            self._lingering.pop(model_id, None)  # evicted while in use: no new request may take it back
            status = self._status.get(model_id)
            if status is not None:  # a failed load of the old files says nothing of the new ones
                status.retry_after = status.last_error = status.last_error_at = None
        for model_id in change.removed:
            self._status.pop(model_id, None)

    async def _catch_up(self, version: str | None) -> None:
        """Wait, at most RELOAD_WAIT_S, until this replica runs the registry a request was sent under, when
        it has not run it yet (the ingress applied it first)."""
        if version is None or self._live.has_run(version):
            return
        deadline = time.monotonic() + RELOAD_WAIT_S
        while not self._live.has_run(version) and (left := deadline - time.monotonic()) > 0:
            await self._live.wait_for_change(left)

    def _model_status(self, model_id: str) -> ReplicaModelStatus:
        return self._status.setdefault(model_id, ReplicaModelStatus())

    # -- the model cache ----------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ModelRuntime:
        """Serve's LRU calls this on a miss, after it has made room."""
        spec = self._live.registry.get(model_id)
        status = self._model_status(model_id)
        lingering = self._lingering.pop(model_id, None)
        if lingering is not None and same_model(lingering.spec, spec) and lingering.revive():  # no reload
            self._counters.revived += 1
            return self._hold(model_id, lingering)
        status.state = ModelState.LOADING
        runtime = runtime_for(spec)
        try:
            # Loading reads files and builds tensors: keep it off the event loop.
            await asyncio.to_thread(runtime.load)
        except Exception as e:
            reason = redact_paths(f"{type(e).__name__}: {e}", spec)
            logger.error("loading model %r failed: %s", model_id, reason)
            now = time.time()
            status.state = ModelState.FAILED
            status.last_error, status.last_error_at = reason, now
            status.load_failures += 1
            status.retry_after = now + self._backoff_s
            self._metrics.load_failed(model_id)
            raise ModelUnavailable(f"Model {model_id!r} could not be loaded: {reason}", model_id=model_id) from None
        status.load_count += 1
        status.last_loaded_at = time.time()
        status.last_load_seconds = runtime.load_seconds
        status.retry_after = None
        self._metrics.loaded(model_id, runtime.load_seconds or 0.0)
        self._runtimes.add(runtime)
        return self._hold(model_id, runtime)

    def _hold(self, model_id: str, runtime: ModelRuntime) -> ModelRuntime:
        self._model_status(model_id).state = ModelState.LOADED
        self._held.add(model_id)
        runtime.on_unload = lambda deferred: self._unloaded(model_id, runtime, deferred)
        return runtime

    def _unloaded(self, model_id: str, runtime: ModelRuntime, deferred: bool) -> None:
        self._held.discard(model_id)
        status = self._model_status(model_id)
        status.state = ModelState.NOT_LOADED
        status.unload_count += 1
        self._metrics.unloaded(model_id)
        if deferred:  # requests still hold it: freed when they are done, unless a new request takes it back
            self._counters.evicted_in_use += 1
            self._lingering[model_id] = runtime

    async def _acquire(self, model_id: str) -> ModelRuntime:
        """The request's model, loaded if need be, and held for the request (the caller releases it).

        A load runs in a task of its own that a cancelled request does not cancel: the load finishes, its
        status is right, and the next request finds the model. The task holds the model as soon as it has it,
        with no await in between, so that no eviction can free it before the request uses it."""
        status = self._status.get(model_id)
        if status is not None and status.retry_after is not None and time.time() < status.retry_after:
            self._counters.refused_in_backoff += 1
            raise ModelUnavailable(
                f"Model {model_id!r} could not be loaded: {status.last_error} "
                f"(not tried again for {status.retry_after - time.time():.0f}s)",
                model_id=model_id,
            )
        if model_id in self._held:
            self._metrics.cache_hit(model_id)
        load = asyncio.ensure_future(self._get_and_hold(model_id))
        try:
            return await asyncio.shield(load)
        except asyncio.CancelledError:  # the request is gone; the load goes on, and lets the model go after
            load.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().release())
            raise

    async def _get_and_hold(self, model_id: str) -> ModelRuntime:
        for _ in range(3):  # a model freed between Serve's answer and the hold is asked for again
            runtime = await self.get_model(model_id)
            if not same_model(runtime.spec, self._live.registry.get(model_id)):  # removed: ModelNotFound
                await self._evict(model_id, only=runtime)  # loaded from files the registry has changed since
                continue
            if runtime.hold():
                return runtime
        raise ModelUnavailable(f"Model {model_id!r} was unloaded three times while this request asked for it")

    # -- predictions --------------------------------------------------------------------------------

    async def predict(
        self, inputs: list[Any], task: str | None = None, registry_version: str | None = None
    ) -> WorkerResult:
        """Answer one request's inputs; concurrent requests for the same model are batched together.
        ``task`` and ``registry_version``: what the ingress decoded the inputs for, under which registry."""
        model_id = serve.get_multiplexed_model_id()
        self._counters.requests += 1
        try:
            await self._catch_up(registry_version)
            # Load (or find) and hold the model before joining the batch queue, so that a cold load does not
            # hold up the queue and an eviction cannot free the model while the request needs it.
            runtime = await self._acquire(model_id)
            try:
                if task is not None and runtime.spec.task.value != task:
                    raise ModelChanged(
                        f"Model {model_id!r} is a {runtime.spec.task.value} model now, no longer {task}: "
                        "the registry changed while the request was on its way; send it again",
                        model_id=model_id,
                    )
                if type(runtime).prepare is not ModelRuntime.prepare:  # e.g. decoding images: in a thread
                    inputs = await asyncio.to_thread(runtime.prepare, inputs)
                predictions = await self._predict(inputs, runtime)
            finally:
                runtime.release()
        except asyncio.CancelledError:
            self._counters.requests_cancelled += 1
            raise
        if isinstance(predictions, Exception):
            raise predictions
        self._model_status(model_id).last_used_at = time.time()
        return WorkerResult(predictions=predictions)

    async def _predict(self, inputs: list[Any], runtime: ModelRuntime) -> list[Scores] | Exception:
        """One request's predictions, through Serve's batch queue once no batch runs (see _run_batch), with
        the requests that waited meanwhile. A request that finds its replica idle (no other request on its
        way to the model thread, no batch running) has nothing to join, and the queue would keep it waiting
        ``batch_wait_timeout_s`` for company. Under load that wait pays: a batch's clients send their next
        requests at about the same time, and the first to arrive gathers the others. At low load it only
        delays the request: so while this replica's last several batches have averaged fewer than COMPANY_AT
        requests, such a request runs at once, as a batch of its own. Measured beside the app without it, in
        one run (4 alternating pairs each): hot-path p50 45.9 against 51.2 ms; at 16 clients 64.8 against
        57.5 req/s on two hot models, and 52.1 against 55.9 on one model (a loss within this machine's noise
        from run to run: docs/performance.md)."""
        self._predicting += 1
        try:
            if (
                self._predicting == 1
                and self._batches_running == 0
                and self._requests_a_batch < COMPANY_AT
                and self._batch_starts(runtime)  # counted now: a request that arrives before it runs waits
            ):
                batch = asyncio.ensure_future(self._run_batch_now([inputs], runtime))
                # Ended by a callback, which runs however the task ends (even cancelled before its first step).
                batch.add_done_callback(lambda _: self._batch_ends(runtime))
                self._lone_batches.add(batch)
                batch.add_done_callback(self._lone_batches.discard)
                # Shielded: a request that leaves ends neither the batch nor its hold on the model while the
                # forward pass runs.
                return (await asyncio.shield(batch))[0]
            await self._no_batch_running.wait()  # join the queue when the model thread is free
            return await self._run_batch(inputs, runtime)
        finally:
            self._predicting -= 1

    # Size and wait are set from BatchingArgs in __init__. A replica runs its models on one torch thread, so
    # a second concurrent batch of a model would add no compute. Serve forms a batch when its first request
    # arrives, not when the previous batch is done: requests that came one by one while a batch ran would
    # queue as batches of one. So _predict holds them until no batch runs, and they join the queue together,
    # as one batch (measured: 1.2 requests a batch at 16 clients without the hold). Serve splits a batch by
    # model and runs the parts at once, so two models' batches can run together. At low load, a request
    # that finds the replica idle skips the queue and its wait (_predict).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _run_batch(
        self, requests: list[list[Any]], runtimes: list[ModelRuntime]
    ) -> list[list[Scores] | Exception]:
        """One model call for the inputs of several requests; Serve never mixes models in a batch, but
        it groups by model id, not by copy: when a registry change replaced a model's copy, requests still on
        the old copy and new ones on the new copy can share a batch, and each copy then gets a call of its
        own, so that requests running on a copy finish on it. If a call fails, each of its requests is run
        alone, so that only the request at fault gets the error."""
        out: list[list[Scores] | Exception | None] = [None] * len(requests)
        copies: dict[int, list[int]] = {}
        for i, runtime in enumerate(runtimes):
            copies.setdefault(id(runtime), []).append(i)
        for indices in copies.values():
            runtime = runtimes[indices[0]]
            if not self._batch_starts(runtime):  # defensive: Serve runs a batch only for requests that hold it
                gone = ModelUnavailable(
                    f"Model {runtime.spec.id!r} was unloaded before its batch ran", model_id=runtime.spec.id
                )
                answers: list[list[Scores] | Exception] = [gone] * len(indices)
            else:
                try:
                    answers = await self._run_batch_now([requests[i] for i in indices], runtime)
                finally:
                    self._batch_ends(runtime)
            for i, answer in zip(indices, answers, strict=True):
                out[i] = answer
        return out  # every request answered

    def _batch_starts(self, runtime: ModelRuntime) -> bool:
        """Count a batch as running, with no await before it, and hold its model for it (the requests that
        hold it may leave while the forward pass runs: it is freed after). False, and nothing counted, if the
        model is freed already."""
        if not runtime.hold():
            return False
        self._batches_running += 1
        self._no_batch_running.clear()
        return True

    def _batch_ends(self, runtime: ModelRuntime) -> None:
        """Undo _batch_starts: let go of the model, and let the requests that waited join the queue."""
        runtime.release()
        self._batches_running -= 1
        if self._batches_running == 0:
            self._no_batch_running.set()

    async def _run_batch_now(self, requests: list[list[Any]], runtime: ModelRuntime) -> list[list[Scores] | Exception]:
        """One model call on one copy of the model (_run_batch splits by copy), held until the batch is done."""
        self._counters.batches += 1
        self._counters.largest_batch = max(self._counters.largest_batch, len(requests))
        self._requests_a_batch += BATCH_SIZE_WEIGHT * (len(requests) - self._requests_a_batch)
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
            # The model runs on its own thread (ModelRuntime.thread): the replica's event loop stays free.
            return await asyncio.get_running_loop().run_in_executor(runtime.thread, runtime.predict, inputs)
        except ServeAppError:
            raise
        except Exception as e:
            logger.exception("model %r failed on a request", runtime.spec.id)
            reason = redact_paths(f"{type(e).__name__}: {e}", runtime.spec)
            raise ModelUnavailable(
                f"Model {runtime.spec.id!r} failed on this input: {reason}", model_id=runtime.spec.id
            ) from None

    async def _infer_or_error(self, runtime: ModelRuntime, inputs: list[Any]) -> list[Scores] | Exception:
        try:
            return await self._infer(runtime, inputs)
        except Exception as e:
            return e

    # -- explicit load and unload -------------------------------------------------------------------

    async def load(self, registry_version: str | None = None) -> None:
        """Load the request's model on this replica (the LRU cap still applies)."""
        await self._catch_up(registry_version)
        (await self._acquire(serve.get_multiplexed_model_id())).release()

    async def unload(self, on_replica: str | None = None) -> bool:
        """Unload the request's model from this replica; False if it did not hold it. ``on_replica`` names
        the replica the call is for (the router sends it there and nowhere else)."""
        return await self._evict(serve.get_multiplexed_model_id())

    async def _evict(self, model_id: str, only: ModelRuntime | None = None) -> bool:
        """Take a model out of the cache and free it, or, if requests still hold it, once they are done;
        False if the cache did not hold it (or held another copy than ``only``)."""
        deferred: list[bool] = []  # marked under Serve's cache lock, so that a reload right after is recorded after it
        runtime = await ray_internals.evict_multiplexed_model(
            self, model_id, lambda r: deferred.append(r.mark_unloaded()), only=only
        )
        if runtime is None:
            return False
        if not deferred[0]:
            await asyncio.to_thread(runtime.free)
        return True

    # -- status -------------------------------------------------------------------------------------

    def status(self, on_replica: str | None = None) -> dict[str, Any]:
        """This replica's id and view of its models, now (``on_replica``: as for unload)."""
        return {"replica_id": serve.get_replica_context().replica_id.unique_id, **self.record_routing_stats()}

    def record_routing_stats(self) -> dict[str, Any]:
        """This replica's view of its models and its counters; Serve's controller polls it every
        routing.stats_period_s and hands it to the routers, from which the ingress reads it too."""
        self._lingering = {m: r for m, r in self._lingering.items() if r.loaded}
        self._counters.live_models = sum(1 for r in self._runtimes if r.loaded)
        return {
            "models": {model_id: s.model_dump(mode="json") for model_id, s in self._status.items()},
            "counters": self._counters.model_dump(mode="json"),
            "registry": self._live.status().model_dump(mode="json"),
        }
