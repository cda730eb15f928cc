"""How a worker replica runs requests: dynamic batching per model, and the lone request that skips it.

Concurrent requests for one model run as one forward pass: Serve's ``@serve.batch`` queue gathers them
(``run_batch``; a batch never mixes models, Serve splits it by multiplexed model id) and each copy of the
model runs its batches on its own thread (``ModelCopy.thread``), so the replica's event loop stays free.

Two rules shape the batches:

* **Wait for the model thread, then queue together.** Serve forms a batch when its first request arrives,
  not when the previous batch is done: requests that came one by one while a batch ran would queue as
  batches of one. So ``predict`` holds them until no batch runs, and they join the queue together, as one
  batch. Two models' batches still run at once (Serve runs a split batch's parts together).
* **A lone request runs at once.** A request that finds its replica idle (no other request on its way to
  the model thread, no batch running) has nothing to join, and the queue would keep it waiting
  ``batch_wait_timeout_s`` for company. Under load that wait pays: a batch's clients send their next
  requests at about the same time, and the first to arrive gathers the others. At low load it only delays
  the request: so while this replica's last several batches have averaged fewer than ``COMPANY_AT``
  requests, such a request runs at once, as a batch of its own. docs/performance.md has what each rule
  measured.

A lone request may also use the idle cores: when the router saw its replica's whole node idle, it says how
many threads the node's worker replicas have between them (``RouteHint.threads``), and a batch of that
request alone (at once, or through the queue) may run its forward pass on that many (``copies.with_threads``,
on the copy's own thread, undone after), where the copy has measured that faster (``threads.IdleThreadsRule``).
Under load every batch keeps the replica's own share.

Every batch holds its model copy until its forward pass ends, even when the requests that started it
leave (a timeout, a client gone): an eviction meanwhile waits for the pass to end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from ray import serve

from deployments.worker.cache import failure_reason, failure_trace
from deployments.worker.copies import ModelCopy, own_status
from serve_app.core.config import BatchingArgs
from serve_app.core.errors import ModelFailed, ModelUnavailable, ServeAppError, bounded
from serve_app.core.outputs import ContractError
from serve_app.core.schemas import ReplicaCounters

logger = logging.getLogger("ray.serve")

Answer = dict[str, np.ndarray]
"""One request's answer: its task's output arrays."""

COMPANY_AT = 1.5
"""Requests per batch, on average over a replica's last several batches, from which a request that finds the
replica idle still waits in Serve's batch queue for company (below it, it runs at once)."""
BATCH_SIZE_WEIGHT = 0.2
"""The weight of the newest batch in that average (an exponential moving average: from a steady 3 requests a
batch, about 7 batches of one bring it under COMPANY_AT)."""


def model_failure(copy: ModelCopy, e: Exception, doing: str = "failed on this input") -> ServeAppError:
    """What a request gets when the model's code raised ``e``: itself for the app's own errors, else a 503
    naming the reason (a ``ContractError``: the task's contract it broke)."""
    if isinstance(e, ServeAppError):
        return own_status(copy.spec.id, e, doing)
    if isinstance(e, ContractError):
        return ModelFailed(
            f"Model {copy.spec.id!r} answered outside the {copy.spec.task} contract: {bounded(str(e))}",
            model_id=copy.spec.id,
        )
    logger.error("model %r %s:\n%s", copy.spec.id, doing, failure_trace(e, copy.spec))
    return ModelFailed(f"Model {copy.spec.id!r} {doing}: {failure_reason(e, copy.spec)}", model_id=copy.spec.id)


def _timed_answer(
    copy: ModelCopy,
    requests: list[list[Any]],
    threads: int | None,
    parameters: list[dict[str, Any] | None] | None,
    own_threads: int,
) -> tuple[list[Answer], float]:
    """``copy.answer`` on the copy's thread, and the seconds it took there (the replica's ``model_seconds``)."""
    start = time.perf_counter()
    answers = copy.answer(requests, threads, parameters, own_threads)
    return answers, time.perf_counter() - start


class Batcher:
    def __init__(self, counters: ReplicaCounters, batching: BatchingArgs | None = None, threads: int = 1) -> None:
        batching = batching or BatchingArgs()
        self.run_batch.set_max_batch_size(batching.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._counters = counters
        self.batches_running = 0
        self.no_batch_running = asyncio.Event()
        self.no_batch_running.set()
        self.predicting = 0  # requests with their inputs ready, waiting for their answers
        self.requests_a_batch = 1.0  # requests per batch over this replica's last several (moving average)
        self._lone_batches: set[asyncio.Future] = set()  # batches of one running for requests that may leave
        self.threads = threads  # this replica's own share of intra-op threads
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    async def predict(
        self,
        inputs: list[Any],
        copy: ModelCopy,
        idle_threads: int | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Answer | Exception:
        """One request's answer, at once as a batch of its own when it is alone on an idle replica of late,
        else through Serve's batch queue once no batch runs, with the requests that waited meanwhile.
        ``idle_threads``: the router saw this replica's node idle (RouteHint.threads): a batch of this request
        alone may run on that many threads (at most this machine's cores). ``parameters``: the request's for
        its task (``ModelCopy.answer`` makes one model call for each set of them in a batch)."""
        self.predicting += 1
        try:
            if (
                self.predicting == 1
                and self.batches_running == 0
                and self.requests_a_batch < COMPANY_AT
                and self._batch_starts(copy)  # counted now: a request that arrives before it runs waits
            ):
                batch = asyncio.ensure_future(self._run_now([inputs], copy, self._extra(idle_threads), [parameters]))
                # Ended by a callback, which runs however the task ends (even cancelled before its first step).
                batch.add_done_callback(lambda _: self._batch_ends(copy))
                self._lone_batches.add(batch)
                batch.add_done_callback(self._lone_batches.discard)
                # Shielded: a request that leaves ends neither the batch nor its hold on the model while the
                # forward pass runs.
                return (await asyncio.shield(batch))[0]
            await self.no_batch_running.wait()  # join the queue when the model thread is free
            return await self.run_batch(inputs, copy, self._extra(idle_threads), parameters)
        finally:
            self.predicting -= 1

    # Size and wait are set from BatchingArgs in __init__.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def run_batch(
        self,
        requests: list[list[Any]],
        copies: list[ModelCopy],
        threads: list[int | None] | None = None,
        parameters: list[dict[str, Any] | None] | None = None,
    ) -> list[Answer | Exception]:
        """One model call for the inputs of several requests. Serve never mixes models in a batch, but it
        groups by model id, not by copy: when a registry change replaced a model's copy, requests still on
        the old copy and new ones on the new copy can share a batch, and each copy then gets a call of its
        own, so that requests running on a copy finish on it. If a call fails, each of its requests is run
        alone, so that only the request at fault gets the error. ``threads``: each request's idle threads
        (``_extra``); a batch of one request that has them runs on them. ``parameters``: each request's."""
        threads = threads or [None] * len(requests)
        parameters = parameters or [None] * len(requests)
        out: list[Answer | Exception | None] = [None] * len(requests)
        by_copy: dict[int, list[int]] = {}
        for i, copy in enumerate(copies):
            by_copy.setdefault(id(copy), []).append(i)
        for indices in by_copy.values():
            copy = copies[indices[0]]
            if not self._batch_starts(copy):  # defensive: Serve runs a batch only for requests that hold it
                answers: list[Answer | Exception] = [
                    ModelUnavailable(f"Model {copy.spec.id!r} was unloaded before its batch ran", model_id=copy.spec.id)
                    for _ in indices
                ]
            else:
                try:
                    # Two models' batches run at once (Serve splits a batch by model): the first takes the idle threads.
                    lone = threads[indices[0]] if len(indices) == 1 and self.batches_running == 1 else None
                    given = [parameters[i] for i in indices]
                    answers = await self._run_now([requests[i] for i in indices], copy, lone, given)
                finally:
                    self._batch_ends(copy)
            for i, answer in zip(indices, answers, strict=True):
                out[i] = answer
        return out  # every request answered

    def _batch_starts(self, copy: ModelCopy) -> bool:
        """Count a batch as running, with no await before it, and hold its copy for it (the requests that hold
        it may leave while the forward pass runs: it is freed after). False, and nothing counted, if the copy
        is freed already."""
        if not copy.hold():
            return False
        self.batches_running += 1
        self.no_batch_running.clear()
        return True

    def _batch_ends(self, copy: ModelCopy) -> None:
        """Undo _batch_starts: let go of the copy, and let the requests that waited join the queue."""
        copy.release()
        self.batches_running -= 1
        if self.batches_running == 0:
            self.no_batch_running.set()

    def _extra(self, idle_threads: int | None) -> int | None:
        """The threads a batch of this request alone runs on: the router's count of the node's idle threads, at
        most this machine's cores; None when that is no more than the replica's own share."""
        threads = min(idle_threads, self._cores) if idle_threads else None
        return threads if threads is not None and threads > self.threads else None

    async def _run_now(
        self,
        requests: list[list[Any]],
        copy: ModelCopy,
        threads: int | None,
        parameters: list[dict[str, Any] | None],
    ) -> list[Answer | Exception]:
        """One model call on one copy for several requests' inputs (one for each set of ``parameters`` among
        them, a request's own or None): each request's answer, or its error. ``threads``: the idle threads
        offered to a batch of one request (``_extra``), which it runs on if the copy's ``IdleThreadsRule``
        says so; the rule is told what the call took."""
        offered = threads is not None
        if offered:
            self._counters.idle_thread_offers += 1
            threads = threads if copy.idle_threads.use() else None
        self._counters.batches += 1
        self._counters.largest_batch = max(self._counters.largest_batch, len(requests))
        self._counters.most_threads = max(self._counters.most_threads, threads or self.threads)
        self._counters.extra_thread_batches += threads is not None and threads > self.threads
        self.requests_a_batch += BATCH_SIZE_WEIGHT * (len(requests) - self.requests_a_batch)
        try:
            return list(await self.infer(copy, requests, threads, parameters, measured=offered))
        except Exception as e:
            if len(requests) == 1:
                return [e]
            alone = zip(requests, parameters, strict=True)
            return [await self._infer_or_error(copy, inputs, given) for inputs, given in alone]

    async def infer(
        self,
        copy: ModelCopy,
        requests: list[list[Any]],
        threads: int | None,
        parameters: list[dict[str, Any] | None],
        measured: bool = False,
    ) -> list[Answer]:
        """The copy's answers, on its own thread; a failure of the model is a 503 naming the reason.
        ``measured``: a lone batch offered the idle threads, whose time per input the copy's rule records."""
        try:
            answers, seconds = await asyncio.get_running_loop().run_in_executor(
                copy.thread, _timed_answer, copy, requests, threads, parameters, self.threads
            )
        except Exception as e:
            raise model_failure(copy, e) from None
        self._counters.model_seconds += seconds
        if measured:
            copy.idle_threads.record(threads is not None, seconds / max(1, sum(len(r) for r in requests)))
        return answers

    async def _infer_or_error(
        self, copy: ModelCopy, inputs: list[Any], parameters: dict[str, Any] | None
    ) -> Answer | Exception:
        try:
            return (await self.infer(copy, [inputs], None, [parameters]))[0]
        except Exception as e:
            return e
