"""A worker replica's models: which it holds, their status, and how copies come and go.

Ray Serve's multiplexing keeps the LRU cache itself (``@serve.multiplexed`` on ``ModelWorker.get_model``,
at most ``MAX_MODELS_PER_REPLICA`` models, under its own lock); this class is what the cache's loader does
and what the replica keeps around it:

* ``load`` (Serve calls it through ``get_model`` on a miss, after it made room): builds the entry's
  runtime from the task catalog, loads and measures the copy off the event loop, and records the outcome;
* a load is never cancelled with the request that started it (a timeout, a client that leaves), so its
  status never stays "loading" and a second request never starts a second load (``acquire``);
* a copy evicted while requests still hold it is freed when they are done, and taken back, not loaded
  again, if a new request wants it meanwhile (``lingering``): at most one copy of a model per replica;
* a load runs on a thread of the replica's loads and may take ``load_timeout_s``: one that has not finished by then
  fails (a 503 naming the timeout, then the back-off) and frees Serve's cache lock, which the load holds,
  so that the replica's other models load meanwhile; its thread, which nothing can stop, goes on, and the
  copy is freed when its load returns. The model is not loaded again from the same files before then;
* a failed load is remembered for ``load_failure_backoff_s``: requests meanwhile get a 503 at once,
  without evicting a healthy model to make room for a load that would fail again;
* a registry change takes the models it made stale out of the cache (``apply``): changed ones load their
  new files on their next request, removed ones are forgotten; a copy in use is freed after its requests;
* the replica keeps its models within its memory budget (``memory.MemoryBudget``), waiting copies
  included: a load first evicts what the router chose for it (``evict_for``, before Serve's LRU makes room
  by count), then, inside the load, the least recently used copies that no request holds, until the new
  copy's expected bytes fit; at most ``MAX_MODELS_PER_REPLICA`` + 1 copies are alive at once, evicted ones
  still in use included. A load that cannot make room waits for copies in use to be freed, up to
  ``memory_wait_s``, then fails with a 503 that says so. A model larger than the whole budget is refused
  with its size and the budget, and every other model keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

from deployments.runtimes.base import runtime_for
from deployments.worker.copies import ModelCopy
from deployments.worker.memory import MemoryBudget
from serve_app.core import ray_internals
from serve_app.core.errors import ForbiddenPath, ModelUnavailable, ServeAppError, error_text
from serve_app.core.live_registry import LiveRegistry, RegistryChange, same_model
from serve_app.core.metrics import WorkerMetrics
from serve_app.core.paths import PROJECT_ROOT, resolve_project_path
from serve_app.core.registry import LocalSource, ModelSpec
from serve_app.core.schemas import ModelState, ReplicaCounters, ReplicaMemory, ReplicaModelStatus, RouteHint

logger = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 2
LIVE_COPIES = MAX_MODELS_PER_REPLICA + 1
"""Most copies alive on a replica at once: the cache's, and one evicted while requests still run on it."""
RELOAD_WAIT_S = 5.0
"""How long a request sent under a registry this replica has not applied yet (the ingress applied it
first) waits for it: a model just added is then found, a changed one loaded from its new files."""


class Owner(Protocol):
    """The deployment whose ``@serve.multiplexed`` loader the cache serves."""

    async def get_model(self, model_id: str) -> ModelCopy: ...


def redact_paths(text: str, spec: ModelSpec) -> str:
    """An error message without the server's absolute paths: the model's files as the registry names them
    when that is a relative path, else as the model's files."""
    if isinstance(spec.source, LocalSource):
        named = spec.source.path
        shown = named if not named.startswith("/") else f"<files of model {spec.id!r}>"
        text = text.replace(str(resolve_project_path(named)), shown)
    return text.replace(f"{PROJECT_ROOT}/", "")


def failure_reason(e: BaseException, spec: ModelSpec) -> str:
    """Why a model's code failed, as a client may read it: the exception's type and message without server
    paths or object addresses, bounded (``errors.error_text``); the log has the whole of it."""
    return error_text(e, lambda text: redact_paths(text, spec))


def failure_trace(e: BaseException, spec: ModelSpec) -> str:
    """The traceback of a model's failure, for the log (whoever debugs it), without server paths (as in every
    log line)."""
    return redact_paths("".join(traceback.format_exception(e)).rstrip(), spec)


def _on_loop(callback: Callable[..., None]) -> Callable[..., None]:
    """``callback``, run on this event loop whichever thread calls it: at once on the loop's own thread, else as
    the loop's next callback (Serve's LRU unloads a copy from a thread of its executor, and the callback
    comes before the loop hears that the unload is done). Dropped once the loop is closed (the replica is
    stopping). Made outside an event loop (a test's), it runs the callback wherever it is called."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def on_loop(*args: Any) -> None:
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:  # a thread with no event loop
            here = False
        if here or loop is None:
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(callback, *args)

    return on_loop


LOAD_THREADS = 8
"""Threads a replica loads models on: one load runs at a time (under Serve's cache lock), and a load that
timed out keeps its thread until it returns; past this many such loads still running, a load waits for a
thread, within its own timeout."""


def on_thread(pool: Executor, fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """``fn()`` on a thread of ``pool``, with the caller's context, as a future of the running loop. A
    StopIteration it raises (a ``next()`` on nothing) arrives as a RuntimeError: a future cannot hold one, and
    would never be settled."""
    context = contextvars.copy_context()

    def run() -> Any:
        try:
            return context.run(fn)
        except StopIteration as e:
            raise RuntimeError(f"StopIteration: {e}") from e

    return asyncio.get_running_loop().run_in_executor(pool, run)


def build_copy(live: LiveRegistry, spec: ModelSpec) -> ModelCopy:
    """A copy of the entry's model, not loaded yet, on the runtime class its entry or its task names; any
    failure (a class that cannot be imported, or that is no ModelRuntime of this task) is a load failure."""
    return ModelCopy(spec, runtime_for(spec, live.catalog), live.catalog.task_of(spec))


class ModelCache:
    def __init__(
        self,
        owner: Owner,
        live: LiveRegistry,
        counters: ReplicaCounters,
        metrics: WorkerMetrics,
        load_failure_backoff_s: float = 30.0,
        memory: MemoryBudget | None = None,
        memory_wait_s: float = 60.0,
        load_timeout_s: float = 300.0,
    ) -> None:
        self._owner, self._live, self._counters, self._metrics = owner, live, counters, metrics
        self._backoff_s = load_failure_backoff_s
        self.memory = memory or MemoryBudget(None, device="cpu")
        self._memory_wait_s = memory_wait_s
        self._load_timeout_s = load_timeout_s
        # Not the loop's default executor, whose few threads the frees use: a load that never returns keeps its
        # thread. Threads of its own, reused (a new thread for each load grew the replica's memory).
        self._load_threads = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load")
        self.abandoned: dict[str, ModelCopy] = {}  # model -> its copy whose load timed out and still runs
        self.status: dict[str, ReplicaModelStatus] = {}
        self.held: set[str] = set()  # the models Serve's LRU cache holds loaded on this replica
        self.lingering: dict[str, ModelCopy] = {}  # evicted while in use, not freed yet
        self.copies: weakref.WeakSet[ModelCopy] = weakref.WeakSet()  # every copy still alive
        self._hints: dict[str, RouteHint] = {}  # model -> what the router said of it for the load to come
        self._freed = asyncio.Event()  # set when a copy's memory is given back

    def model_status(self, model_id: str) -> ReplicaModelStatus:
        return self.status.setdefault(model_id, ReplicaModelStatus())

    # -- loading --------------------------------------------------------------------------------------

    async def load(self, model_id: str) -> ModelCopy:
        """Serve's LRU calls this (through ``get_model``) on a miss, after it has made room by count, under its
        cache's lock: loads are one at a time. An entry that a registry change changed while its files loaded
        (a change waits for no load) is loaded again from its new files; one it removed is ModelNotFound."""
        for _ in range(3):
            copy = await self._load_entry(model_id)
            if copy is not None:
                return copy
        raise ModelUnavailable(
            f"Model {model_id!r} changed in the registry three times while it loaded; send the request again",
            model_id=model_id,
            retry_after_s=1,
        )

    def _current(self, spec: ModelSpec) -> bool:
        """Whether the registry in force still has this entry as it was (a registry change waits for no load)."""
        return spec.id in self._live.registry and same_model(spec, self._live.registry.get(spec.id))

    def _outdated(self, spec: ModelSpec, status: ReplicaModelStatus) -> None:
        """A load whose entry changed or went while it ran: its outcome is not the entry's as it is now. Raises
        ModelNotFound if the entry went; else the status is as a registry change leaves it, to load again."""
        self._live.registry.get(spec.id)  # ModelNotFound
        if status.state is ModelState.LOADING:
            status.state = ModelState.NOT_LOADED

    async def _outdated_copy(self, copy: ModelCopy, status: ReplicaModelStatus) -> None:
        """Free a copy whose entry changed or went while it loaded; then as ``_outdated``, by the registry as it
        is after the free (an entry may come back meanwhile: it is loaded again, never this freed copy)."""
        await asyncio.to_thread(copy.free)
        return self._outdated(copy.spec, status)

    async def _load_entry(self, model_id: str) -> ModelCopy | None:
        """One load of the model's entry as the registry has it now; None if the entry changed meanwhile."""
        spec = self._live.registry.get(model_id)
        status = self.model_status(model_id)
        lingering = self.lingering.pop(model_id, None)
        if lingering is not None and same_model(lingering.spec, spec) and lingering.revive():  # no reload
            self._counters.revived += 1
            self._metrics.revived(model_id, spec.task, lingering.size_bytes)
            return self._hold(model_id, lingering)
        self._refuse_in_backoff(model_id, status)  # requests that queued on the cache's lock behind a failed load
        self._refuse_while_abandoned(spec)
        hint = self._hints.pop(model_id, None)
        expected = next((b for b in (status.size_bytes, hint and hint.size_bytes, spec.memory_bytes) if b), 0)
        budget = self.memory.budget
        if budget is not None and expected > budget and status.weights_bytes:
            # A resident memory growth over the budget may have caught other work of the process: refused before
            # loading only for the weights' exact bytes, and the load measures the growth again.
            expected = status.weights_bytes
        self._refuse_if_never_fits(spec, expected)
        previous, status.state = status.state, ModelState.LOADING
        try:
            await self._make_room(model_id, expected)
        except ModelUnavailable:
            status.state = previous
            raise
        copy: ModelCopy | None = None
        finished = True
        try:
            copy = build_copy(self._live, spec)
            loading = on_thread(self._load_threads, functools.partial(self._load_in_roots, copy))  # off the loop
            finished = bool((await asyncio.wait({loading}, timeout=self._load_timeout_s))[0])
            if finished:
                loading.result()
        except Exception as e:
            if copy is not None:
                await asyncio.to_thread(copy.free)  # what a half-done load holds
            reason = redact_paths(f"{type(e).__name__}: {e}", spec)
            logger.error("loading model %r failed: %s\n%s", model_id, reason, failure_trace(e, spec))
            if not self._current(spec):  # the failure of files the entry no longer names
                return self._outdated(spec, status)
            raise self._failed(spec, status, failure_reason(e, spec)) from None
        if not finished:
            reason = self._abandon(spec, copy, loading, expected)
            if not self._current(spec):
                return self._outdated(spec, status)
            raise self._failed(spec, status, reason)
        if not self._current(spec):  # changed or removed while it loaded
            return await self._outdated_copy(copy, status)
        status.weights_bytes, status.rss_growth_bytes = copy.weights_bytes, copy.rss_growth_bytes
        status.size_bytes = copy.size_bytes
        try:
            self._refuse_if_never_fits(spec, copy.size_bytes or 0)
            await self._make_room(model_id, copy.size_bytes or 0)  # it took more than expected
        except ModelUnavailable:
            await asyncio.to_thread(copy.free)
            if status.state is ModelState.LOADING:  # no room now (not a failed load): as it was before
                status.state = previous
            raise
        if not self._current(spec):  # changed or removed while it made room (the change cleared the sizes)
            return await self._outdated_copy(copy, status)
        status.load_count += 1
        status.last_loaded_at = time.time()
        status.last_load_seconds = copy.load_seconds
        status.retry_after = None
        self._metrics.loaded(model_id, spec.task, copy.load_seconds or 0.0, copy.size_bytes)
        self.copies.add(copy)
        copy.on_released = self._released_callback()
        return self._hold(model_id, copy)

    def _load_in_roots(self, copy: ModelCopy) -> ModelCopy:
        """Load the copy (reads files, builds tensors: on a thread), its local source checked against the model
        roots first, the links among its files included: the registry's check resolved the folder alone, and a
        link under a root may have been pointed elsewhere since."""
        source = copy.spec.source
        if isinstance(source, LocalSource) and (problem := self._live.catalog.check_files(source.path)):
            raise ForbiddenPath(f"{problem}, checked again at load")
        return copy.load()

    def _abandon(self, spec: ModelSpec, copy: ModelCopy, loading: asyncio.Future[Any], expected: int) -> str:
        """A load past ``load_timeout_s``, whose thread goes on: its copy counts in the replica's memory for the
        bytes the load was expected to take until it returns, and is freed then, whatever it returns. Returns
        the failure's reason."""
        self._counters.load_timeouts += 1
        self.abandoned[spec.id] = copy
        copy.expected_bytes = expected
        self.copies.add(copy)
        copy.on_released = self._released_callback()

        def returned(future: asyncio.Future[Any]) -> None:
            if self.abandoned.get(spec.id) is copy:
                del self.abandoned[spec.id]
            error = None if future.cancelled() else future.exception()
            outcome = f"failed: {failure_reason(error, spec)}" if error is not None else "returned"
            logger.info("the timed-out load of model %r %s; freeing its copy", spec.id, outcome)
            copy.free_soon()

        loading.add_done_callback(returned)
        reason = f"its load did not finish within {self._load_timeout_s:g}s (worker.load_timeout_s)"
        logger.error("loading model %r failed: %s; its thread goes on, and frees it when it returns", spec.id, reason)
        return reason

    def _refuse_while_abandoned(self, spec: ModelSpec) -> None:
        """The 503 of a model whose last load timed out and still runs, from the same files: another load of
        them would start a second thread beside it (not recorded as a failure, and nothing evicted for it)."""
        running = self.abandoned.get(spec.id)
        if running is None or not same_model(running.spec, spec):
            return
        again = {"retry_after_s": self._backoff_s} if self._backoff_s > 0 else {}
        raise ModelUnavailable(
            f"Model {spec.id!r} could not be loaded: its last load did not finish within {self._load_timeout_s:g}s "
            "(worker.load_timeout_s) and is still running",
            model_id=spec.id,
            **again,
        )

    def expect(self, model_id: str, hint: RouteHint | None) -> None:
        """What the router said of a model whose request is on its way to ``load``: its size as the router
        knows it."""
        if hint is not None:
            self._hints[model_id] = hint

    def _failed(self, spec: ModelSpec, status: ReplicaModelStatus, reason: str) -> ModelUnavailable:
        """Record a failed load (not tried again during the back-off) and return the 503 its request gets."""
        now = time.time()
        status.state = ModelState.FAILED
        status.last_error, status.last_error_at = reason, now
        status.load_failures += 1
        status.retry_after = now + self._backoff_s
        self._metrics.load_failed(spec.id, spec.task)
        again = {"retry_after_s": self._backoff_s} if self._backoff_s > 0 else {}
        return ModelUnavailable(f"Model {spec.id!r} could not be loaded: {reason}", model_id=spec.id, **again)

    def _refuse_if_never_fits(self, spec: ModelSpec, size: int) -> None:
        """A copy larger than the whole budget can never be loaded here: a failed load that says so (and is
        not tried again during the back-off), evicting nothing."""
        budget = self.memory.budget
        if budget is None or size <= budget:
            return
        reason = (
            f"a copy takes {size} bytes, more than this replica's memory budget for models of {budget} bytes "
            f"(worker.memory_bytes less the replica's baseline of {self.memory.baseline} bytes)"
        )
        self._counters.refused_over_budget += 1
        logger.error("loading model %r refused: %s", spec.id, reason)
        raise self._failed(spec, self.model_status(spec.id), reason)

    async def _make_room(self, model_id: str, size: int) -> None:
        """Evict, from inside the load, the least recently used copies (those no request holds first) until at
        most LIVE_COPIES are alive with the new one and ``size`` more bytes fit the budget; a copy in use
        lingers until its requests are done, and the load waits for it to be freed, up to memory_wait_s
        (then a 503 that says so). A copy whose load timed out and still runs counts for its bytes, not
        against LIVE_COPIES: it is in no cache, so no eviction could make room for it."""
        deadline, waited = time.monotonic() + self._memory_wait_s, False
        while True:
            live = self.memory.live(self.copies)  # the new copy is not among them yet
            used = self.memory.used(live)
            fits = self.memory.fits(used, size)
            timed_out = [c for c in live if c.timed_out]
            if len(live) - len(timed_out) + 1 <= LIVE_COPIES and fits:
                return
            # The least recently used copy that no request holds; where bytes are short, else one that requests
            # hold, which is freed when they are done (waited for below). Short of a copy only, the copies
            # evicted in use are the ones to wait for: evicting another one in use would not free it sooner.
            cached = [m for m in ray_internals.cached_model_ids(self._owner) if m != model_id]
            victim = next((m for m in cached if self._idle(m)), None) or (None if fits else next(iter(cached), None))
            if victim is not None:
                if fits:  # short of a copy only (one lingering): room by count, as the LRU makes it
                    self._counters.evicted_by_lru += 1
                    cause = "count"
                else:
                    self._counters.evicted_for_memory += 1
                    cause = "memory"
                await self._evict_during_load(victim, cause=cause)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = f" and {len(timed_out)} whose timed-out loads still run" if timed_out else ""
                raise ModelUnavailable(
                    f"Model {model_id!r} does not fit now: this replica's models take {used} of its "
                    f"{self.memory.budget} bytes, in {len(live) - len(timed_out)} copies that requests still run "
                    f"on{stuck}; send the request again",
                    model_id=model_id,
                )
            if not waited:
                self._counters.waited_for_memory += 1
                waited = True
            self._freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)

    def _held_copy(self, model_id: str) -> ModelCopy | None:
        """The copy of the model that Serve's cache holds (loaded, not unloaded since: its ``on_unload`` is set);
        None if it holds none. A copy a change replaced, still running requests, is not it."""
        return next((c for c in self.copies if c.spec.id == model_id and c.loaded and c.on_unload), None)

    def _idle(self, model_id: str) -> bool:
        """Whether Serve's cache holds a copy of the model that no request or batch holds now."""
        copy = self._held_copy(model_id)
        return copy is not None and copy.in_use == 0

    async def _evict_during_load(self, model_id: str, cause: str) -> None:
        copy = ray_internals.evict_multiplexed_model(self._owner, model_id)
        if copy is None:
            return
        copy.evicted_by = cause
        if not copy.mark_unloaded():
            await asyncio.to_thread(copy.free)

    def _released_callback(self) -> Callable[[], None]:
        """Set the freed event from whichever thread gives a copy's memory back."""
        return _on_loop(self._freed.set)

    async def evict_for(self, model_id: str, victims: tuple[str, ...]) -> None:
        """Evict the copies the router chose for a load of ``model_id`` (a miss) before Serve's LRU makes room
        by count: the least worth, not merely the least recent (deployments/routing/policy.py)."""
        if model_id in self.held:
            return
        lru = ray_internals.cached_model_ids(self._owner)
        for victim in victims:
            if victim != model_id and victim in self.held and await self.evict(victim, "router", between_loads=True):
                self._counters.evicted_by_router += 1
                self._counters.router_victim_not_lru += bool(lru) and victim != lru[0]

    def _hold(self, model_id: str, copy: ModelCopy) -> ModelCopy:
        self.model_status(model_id).state = ModelState.LOADED
        self.held.add(model_id)
        copy.evicted_by = None  # held again (a revived copy): its next eviction names its own cause
        copy.on_unload = _on_loop(lambda deferred: self._unloaded(model_id, copy, deferred))
        return copy

    def _unloaded(self, model_id: str, copy: ModelCopy, deferred: bool) -> None:
        self.held.discard(model_id)
        if copy.evicted_by is None:  # Serve's LRU, making room by count
            self._counters.evicted_by_lru += 1
        status = self.model_status(model_id)
        status.state = ModelState.NOT_LOADED
        status.unload_count += 1
        self._metrics.unloaded(model_id, copy.spec.task)
        if deferred:  # requests still hold it: freed when they are done, unless a new request takes it back
            self._counters.evicted_in_use += 1
            self.lingering[model_id] = copy

    def refuse_early(self, model_id: str) -> None:
        """The 503 a request for a model this replica does not hold gets before anything is evicted for it:
        the model is in its back-off after a failed load, its last load timed out and still runs, or its
        weights are known to be larger than the whole budget (measured here: its load would be refused after
        Serve's LRU had made room by count, and the router's victims gone too); an id the registry does not
        have is ModelNotFound."""
        if model_id in self.held:
            return
        spec = self._live.registry.get(model_id)
        self._refuse_while_abandoned(spec)
        status = self.status.get(model_id)
        if status is not None:
            self._refuse_in_backoff(model_id, status)
            if status.weights_bytes:
                self._refuse_if_never_fits(spec, status.weights_bytes)

    def _refuse_in_backoff(self, model_id: str, status: ReplicaModelStatus) -> None:
        """The 503 of a model whose last load failed less than ``load_failure_backoff_s`` ago."""
        if status.retry_after is None or (left := status.retry_after - time.time()) <= 0:
            return
        self._counters.refused_in_backoff += 1
        raise ModelUnavailable(
            f"Model {model_id!r} could not be loaded: {status.last_error} (not tried again for {left:.0f}s)",
            model_id=model_id,
            retry_after_s=left,
        )

    async def acquire(self, model_id: str, predicting: bool = True) -> ModelCopy:
        """The request's model, loaded if need be, and held for the request (the caller releases it).

        A load runs in a task of its own that a cancelled request does not cancel: the load finishes, its
        status is right, and the next request finds the model. The task holds the copy as soon as it has it,
        with no await in between, so that no eviction can free it before the request uses it."""
        self.refuse_early(model_id)
        if predicting and model_id in self.held:  # a prediction's hit (an explicit load is none)
            self._metrics.cache_hit(model_id)
        load = asyncio.ensure_future(self._get_and_hold(model_id))
        try:
            return await asyncio.shield(load)
        except asyncio.CancelledError:  # the request is gone; the load goes on, and lets the model go after
            load.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().release())
            raise

    async def _get_and_hold(self, model_id: str) -> ModelCopy:
        for _ in range(3):  # a copy freed between Serve's answer and the hold is asked for again
            copy = await self._owner.get_model(model_id)
            if not same_model(copy.spec, self._live.registry.get(model_id)):  # removed: ModelNotFound
                await self.evict(model_id, only=copy, cause="registry")  # loaded from files changed since
                continue
            if copy.hold():
                return copy
        raise ModelUnavailable(f"Model {model_id!r} was unloaded three times while this request asked for it")

    # -- unloading ------------------------------------------------------------------------------------

    async def evict(
        self, model_id: str, cause: str = "explicit", only: ModelCopy | None = None, between_loads: bool = False
    ) -> bool:
        """Take a model out of Serve's cache and free it, or, if requests still hold it, once they are done;
        False if the cache did not hold it (or held another copy than ``only``). ``cause``: who asked. At once,
        whatever load is under way; ``between_loads``: once no load holds Serve's cache lock (the router's
        victims)."""
        deferred: list[bool] = []  # marked as it leaves Serve's cache: a reload right after is recorded after it

        def mark(copy: ModelCopy) -> None:
            copy.evicted_by = cause
            deferred.append(copy.mark_unloaded())

        if between_loads:
            copy = await ray_internals.evict_multiplexed_model_between_loads(self._owner, model_id, mark)
        else:
            copy = ray_internals.evict_multiplexed_model(self._owner, model_id, mark, only=only)
        if copy is None:
            return False
        if not deferred[0]:
            await asyncio.to_thread(copy.free)
        return True

    # -- the registry ---------------------------------------------------------------------------------

    async def apply(self, change: RegistryChange) -> None:
        """Take the models a registry change made stale out of the cache: changed ones (the next request
        loads the new files) and removed ones. Requests running on a copy finish on it; it is freed after."""
        for model_id in change.stale:
            await self.evict(model_id, cause="registry")
            self.lingering.pop(model_id, None)  # evicted while in use: no new request may take it back
            status = self.status.get(model_id)
            if status is not None:  # a failed load of the old files, and their sizes, say nothing of the new ones
                status.retry_after = status.last_error = status.last_error_at = None
                status.size_bytes = status.weights_bytes = status.rss_growth_bytes = None
                if status.state is ModelState.FAILED:
                    status.state = ModelState.NOT_LOADED
            self._hints.pop(model_id, None)
        for model_id in change.removed:
            self.status.pop(model_id, None)

    async def preload(self) -> None:
        """Load the registry's preload models, in order, until the replica is full."""
        for spec in [m for m in self._live.registry.models if m.preload]:
            if len(self.held) == MAX_MODELS_PER_REPLICA:
                break
            try:
                await self._owner.get_model(spec.id)
            except ServeAppError as e:  # a broken preload must not keep the replica from starting
                logger.error("preloading %r failed: %s", spec.id, e.message)

    async def catch_up(self, model_id: str, version: str | None, applied_at: float | None = None) -> None:
        """Wait, at most RELOAD_WAIT_S, until this replica runs the registry a request was sent under, when
        it has yet to apply it (the ingress applied it first, at ``applied_at``: ``LiveRegistry.behind``).
        Still behind then (Serve reconfigures it late: a replica that died during the rollout is being
        replaced meanwhile), the request gets a 503 to send again: never an answer under the registry it was
        not sent under (a changed model's old files, a 404 for a model just added)."""
        if version is None or not self._live.behind(version, applied_at):
            return
        deadline = time.monotonic() + RELOAD_WAIT_S
        while self._live.behind(version, applied_at) and (left := deadline - time.monotonic()) > 0:
            await self._live.wait_for_change(left)
        if self._live.behind(version, applied_at):
            raise ModelUnavailable(
                f"this worker replica has not applied registry {version} within {RELOAD_WAIT_S:g}s (Serve is still "
                f"updating it); send the request for {model_id!r} again",
                model_id=model_id,
                retry_after_s=1,
            )

    # -- status ---------------------------------------------------------------------------------------

    def _registered_status(self, model_id: str) -> ReplicaModelStatus | None:
        """The model's status, None once the registry removed it (a request that ran on its last copy does not
        bring it back into the report)."""
        return self.model_status(model_id) if model_id in self._live.registry else None

    def used(self, model_id: str) -> None:
        """A request was answered by the model."""
        if (status := self._registered_status(model_id)) is not None:
            status.last_used_at = time.time()

    def request_failed(self, model_id: str, message: str) -> None:
        """The model's code failed a request (``ModelFailed``): counted, with the message its client got."""
        if (status := self._registered_status(model_id)) is not None:
            status.request_failures += 1
            status.last_request_error, status.last_request_error_at = message, time.time()

    def report(self) -> dict[str, Any]:
        """The models' status, for ``record_routing_stats``; live copies are counted now."""
        self.lingering = {m: c for m, c in self.lingering.items() if c.loaded}
        self._counters.live_models = len(self.memory.live(self.copies))
        for model_id in list(self.held):  # the held copies' measures (an evicted one's stays as last reported)
            copy, status = self._held_copy(model_id), self.status.get(model_id)
            if copy is not None and status is not None:
                status.idle_threads = copy.idle_threads.report()
                status.packed_batches = copy.packed_batches
        return {model_id: s.model_dump(mode="json") for model_id, s in self.status.items()}

    def memory_report(self) -> ReplicaMemory:
        report = self.memory.report(self.copies, self.lingering.values())
        self._metrics.memory(report.used_bytes, report.budget_bytes)
        return report
