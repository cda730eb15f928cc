"""One copy of a model on a worker replica: its runtime, its size, and the rules of its life.

A copy is what Ray Serve's multiplexing LRU holds (``ModelWorker.get_model`` returns it), and what
requests hold while they run on it:

* ``hold`` and ``release`` count the requests (and batches) running on it; an unload meanwhile (the LRU
  evicting it, a registry change, an explicit unload) marks it, and the weights are freed when the last of
  them is done, so those requests complete;
* ``revive`` takes back a copy whose free still waits for its requests, when a new request wants the same
  model: at most one copy of a model per replica;
* ``free`` drops the runtime's model, collects garbage, and gives the freed memory back to the system
  (glibc keeps it otherwise: ``malloc_trim``), and on CUDA empties torch's cache;
* ``thread`` is the one thread the copy's forward passes run on, so that each pass finds the same thread's
  allocator arena and torch state (asyncio's shared pool hands each call to whichever of its threads takes
  it); another copy has a thread of its own, so two models' batches run at once. ``free`` ends it.

``load`` measures the copy: the exact bytes of its weights and buffers as its runtime reports them
(``ModelRuntime.size_bytes``), and how much the process's resident memory grew while it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import inspect
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from deployments.runtimes.base import ModelRuntime, runtime_code
from deployments.worker.threads import IdleThreadsRule
from serve_app.core.errors import InvalidInput, ModelFailed, ServeAppError, bounded
from serve_app.core.outputs import ContractError, output_code
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import Task

logger = logging.getLogger("ray.serve")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None where /proc does not tell."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def trim_memory() -> bool:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``); False where there is none."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def _device_allocated(device: str) -> int | None:
    """The memory torch has allocated on a CUDA device now; None on any other device."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.memory_allocated(torch.device(device))


@contextmanager
def with_threads(threads: int | None, own: int | None = None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: ``own``), then set ``own`` (None: the count
    before). Called on the copy's own thread, just before its forward pass: with torch's OpenMP,
    ``set_num_threads`` sets the calling thread's own count and the process's default, and a thread that has
    run keeps its count, so another copy's thread running meanwhile is not changed. A thread that first ran
    while another one's count was raised started with that count as its own: ``own`` sets it back."""
    target = threads or own
    if target is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    after = own or before
    if target != before:
        torch.set_num_threads(target)
    try:
        yield
    finally:
        if torch.get_num_threads() != after:
            torch.set_num_threads(after)


def byte_count(size: Any) -> int | None:
    """A runtime's ``size_bytes()`` answer as a plain int (a numpy integer, or a float, rounded up: as the
    replica's report and the router carry it), or None; a ``ContractError`` (its load fails, saying so) for
    anything else: a negative, NaN or infinite number, a bool, a string."""
    if size is None:
        return None
    if isinstance(size, numbers.Real) and not isinstance(size, bool) and math.isfinite(size) and size >= 0:
        return int(size) if isinstance(size, numbers.Integral) else math.ceil(size)
    raise ContractError(f"size_bytes() must answer a number of bytes (an int of at least 0) or None, got {size!r}")


def one_per_input(values: Any, count: int, what: str) -> list[Any]:
    """``values`` as a list of ``count`` items, one per input: a list, a tuple, or an array or tensor along its
    first axis (as an encoder returns them); else a ``ContractError`` that says ``what`` (the rule broken)."""
    if not isinstance(values, list | Mapping) and hasattr(values, "__len__") and hasattr(values, "__getitem__"):
        values = list(values)
    if not isinstance(values, list) or len(values) != count:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ContractError(f"{what}: {count} input{'s' if count != 1 else ''}, got {got}")
    return values


def own_status(model_id: str, e: ServeAppError, doing: str = "failed on this input") -> ServeAppError:
    """One of the app's errors that a model's or a task's own code raised, as its request gets it: with its own
    status where it has one (an input the model refuses: 422, 400; the model unavailable: 503), but the app's
    base error, ``ServeAppError`` itself, is a 500, the app's own fault: from a model's code it is the model's
    failure, a 503 naming it, as for any other exception the model's code raises."""
    if not e.internal:
        return e
    return ModelFailed(f"Model {model_id!r} {doing}: {type(e).__name__}: {bounded(e.message)}", model_id=model_id)


class ModelCopy:
    def __init__(self, spec: ModelSpec, runtime: ModelRuntime, task: Task) -> None:
        self.spec = spec
        self.task = task
        self._runtime: ModelRuntime | None = runtime
        self.device = runtime.device
        self.load_seconds: float | None = None
        self.weights_bytes: int | None = None  # exact, from the runtime
        self.rss_growth_bytes: int | None = None  # the process's resident memory, after the load less before
        self.device_growth_bytes: int | None = None  # on a CUDA device: its memory torch allocated, likewise
        self.expected_bytes: int | None = None  # a load that timed out and still runs: what it was expected to take
        self._state_lock = threading.Lock()
        self._in_use = 0
        self._unload_pending = False  # unloaded while requests held it: freed when the last one is done
        self._freed = False
        self._thread: ThreadPoolExecutor | None = None
        # Told once when the copy is unloaded, with whether its free waits for requests still holding it.
        self.on_unload: Callable[[bool], None] | None = None
        # Told once when its memory is given back (from whichever thread frees it).
        self.on_released: Callable[[], None] | None = None
        self.released = threading.Event()  # set once the free is done: its memory no longer counts
        self.evicted_by: str | None = None  # who took it out of the cache: None is Ray's LRU
        self.idle_threads = IdleThreadsRule()  # whether its lone requests run faster on a node's idle threads
        self.prepares = type(runtime).prepare is not ModelRuntime.prepare
        # The keyword arguments its predict takes (None: any), read once: requests' parameters are checked against
        # them in every batch that has some.
        takes = inspect.signature(runtime.predict).parameters
        self._predict_takes: frozenset[str] | None = (
            None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values()) else frozenset(takes)
        )

    @property
    def runtime(self) -> ModelRuntime:
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        return runtime

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    @property
    def packed_batches(self) -> int | None:
        """The forward passes its runtime ran packed (``deployments.runtimes.packing``); None where its batches
        run padded (its packing refused at load, a runtime that packs none) or it is not loaded."""
        packing = self._runtime.packing if self._runtime is not None else None
        return packing.passes if packing is not None else None

    @property
    def timed_out(self) -> bool:
        """Whether its load timed out (``expected_bytes`` set then): it is in no cache, and is freed once its
        load returns."""
        return self.expected_bytes is not None

    @property
    def size_bytes(self) -> int | None:
        """What the copy takes, as the replica's budget counts it: the larger of its weights' exact bytes and
        the growth at its load (a tokenizer, allocator overhead) of the memory the budget is: the process's
        resident memory on the CPU, the device's memory on a CUDA device (where the host's growth, a CUDA
        context and the weights' staging, is not the budget's). Before its load: the bytes it was expected to
        take if its load timed out and still runs (``expected_bytes``), else None."""
        grown = self.device_growth_bytes if self.device.startswith("cuda") else self.rss_growth_bytes
        sizes = [b for b in (self.weights_bytes, grown) if b is not None]
        return max(sizes) if sizes else self.expected_bytes

    def load(self) -> ModelCopy:
        """Load the runtime's model and measure it (slow: call it off the event loop)."""
        t0, before, device_before = time.perf_counter(), resident_bytes(), _device_allocated(self.device)
        with runtime_code("load()"):
            self.runtime.load()
        self.load_seconds = time.perf_counter() - t0
        after, device_after = resident_bytes(), _device_allocated(self.device)
        self.rss_growth_bytes = max(0, after - before) if after is not None and before is not None else None
        if device_before is not None and device_after is not None:
            self.device_growth_bytes = max(0, device_after - device_before)
        with runtime_code("size_bytes()"):
            self.weights_bytes = byte_count(self.runtime.size_bytes())
        logger.info(
            "loaded model %r on %s in %.2fs: %s bytes of weights, resident memory +%s bytes",
            self.spec.id,
            self.device,
            self.load_seconds,
            self.weights_bytes,
            self.rss_growth_bytes,
        )
        return self

    # -- running ------------------------------------------------------------------------------------------

    @property
    def thread(self) -> ThreadPoolExecutor:
        """The one thread this copy runs its batches on (created on first use; ``free`` ends it)."""
        with self._state_lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"model-{self.spec.id}")
            return self._thread

    def prepare(self, inputs: list[Any]) -> list[Any]:
        with runtime_code("prepare()"):
            return self.runtime.prepare(inputs)

    def answer(
        self,
        requests: Sequence[list[Any]],
        threads: int | None = None,
        parameters: Sequence[dict[str, Any] | None] | None = None,
        own_threads: int | None = None,
    ) -> list[dict[str, np.ndarray] | Exception]:
        """One forward pass (or as few as the runtime makes) for the inputs of several requests, and each
        request's answer encoded by the task's output kind: one ``predict`` call for each set of request
        ``parameters`` among them (keyword arguments; none for requests without), but those the output kind
        applies itself (``OutputKind.options``: classification's ``top_k``), which each request's answer gets
        after its encoding, whatever the runtime. A call that raises one of
        the app's errors (a request's own fault: an input its runtime refuses, a prompt the model has not) is
        made again for each of its requests alone, so that only the requests at fault get an error, each its
        own. ``ContractError`` if the runtime's rows do not fit the task's contract. Runs on ``thread``;
        ``threads``: the intra-op threads of this forward pass, ``own_threads`` the replica's share, which the
        pass runs on without ``threads`` and which the thread keeps after (``with_threads``)."""
        given = [params or {} for params in parameters] if parameters is not None else [{}] * len(requests)
        kind = self.task.output
        options = [{k: v for k, v in params.items() if k in kind.options} for params in given]
        given = [{k: v for k, v in params.items() if k not in kind.options} for params in given]
        groups: dict[str, list[int]] = {}
        for i, params in enumerate(given):
            groups.setdefault(json.dumps(params, sort_keys=True), []).append(i)
        out: list[dict[str, np.ndarray] | Exception | None] = [None] * len(requests)
        with with_threads(threads, own_threads):
            self._answer_groups(requests, given, options, groups, out)
        # Every request answered; an error of the model's own code with its status (own_status).
        return [own_status(self.spec.id, a) if isinstance(a, ServeAppError) else a for a in out]  # type: ignore[misc]

    def _answer_groups(
        self,
        requests: Sequence[list[Any]],
        given: list[dict[str, Any]],
        options: list[dict[str, Any]],
        groups: dict[str, list[int]],
        out: list[dict[str, np.ndarray] | Exception | None],
    ) -> None:
        """``answer``'s calls, one for each group of requests with the same parameters, into ``out``."""
        for indices in groups.values():
            params = given[indices[0]]
            if self._refusal(params) is not None:  # the runtime takes no such parameter: none of them runs
                for i in indices:
                    out[i] = self._refusal(params)
                continue
            try:
                answers: list[dict[str, np.ndarray] | Exception] = list(
                    self._predict([requests[i] for i in indices], params)
                )
            except ServeAppError as e:
                answers = [e] if len(indices) == 1 else [self._predict_alone(requests[i], params) for i in indices]
            for i, answer in zip(indices, answers, strict=True):
                out[i] = self._applied(answer, options[i]) if options[i] and isinstance(answer, dict) else answer

    def _predict(
        self, requests: Sequence[list[Any]], params: dict[str, Any]
    ) -> list[dict[str, np.ndarray] | ServeAppError]:
        """One ``predict`` call for the inputs of requests with the same parameters: each one's answer, or the
        error of its task's own code (``output_code``), which fails that request alone: the model has run."""
        flat = [item for inputs in requests for item in inputs]
        with runtime_code("predict()"):
            answer = self.runtime.predict(flat, **params)
        rows = one_per_input(answer, len(flat), "predict must answer one row per input")
        out, start = [], 0
        for inputs in requests:
            out.append(self._task_step("encode its answer", self.task.output.encode, rows[start : start + len(inputs)]))
            start += len(inputs)
        return out

    def _applied(self, answer: dict[str, np.ndarray], options: dict[str, Any]) -> dict[str, np.ndarray] | ServeAppError:
        """One request's answer with its output options applied (classification's ``top_k``)."""
        return self._task_step("apply its options", self.task.output.apply, answer, **options)

    def _task_step(self, step: str, run: Callable[..., dict[str, np.ndarray]], *args: Any, **kwargs: Any) -> Any:
        """A step of the task's output kind for one request: its answer, or its error (``output_code``)."""
        try:
            with output_code(self.spec.id, self.task.name, step, runtime_answers=True):
                return run(*args, **kwargs)
        except ServeAppError as e:
            return e

    def _predict_alone(self, inputs: list[Any], params: dict[str, Any]) -> dict[str, np.ndarray] | ServeAppError:
        try:
            return self._predict([inputs], params)[0]
        except ServeAppError as e:
            return e

    def _refusal(self, parameters: dict[str, Any]) -> InvalidInput | None:
        """InvalidInput unless the runtime's ``predict`` takes these keyword arguments (a runtime of one's own
        written without its task's parameters does not)."""
        if not parameters or self._predict_takes is None:
            return None
        missing = next((name for name in parameters if name not in self._predict_takes), None)
        if missing is None:
            return None
        return InvalidInput(
            f"parameters.{missing}: model {self.spec.id!r} takes no {missing} (its runtime does not)",
            field=f"parameters.{missing}",
        )

    # -- holding and freeing ------------------------------------------------------------------------------

    def hold(self) -> bool:
        """Hold the copy for one request (or one batch), so that an unload meanwhile waits until ``release``.
        False if it is freed already (the caller gets the model again)."""
        with self._state_lock:
            if self._freed:
                return False
            self._in_use += 1
            return True

    def release(self) -> None:
        with self._state_lock:
            self._in_use -= 1
            free = self._unload_pending and self._in_use == 0
            if free:
                self._unload_pending, self._freed = False, True
        if free:
            self.free_soon()

    @property
    def in_use(self) -> int:
        """The requests and batches holding this copy now."""
        return self._in_use

    @contextmanager
    def held(self) -> Iterator[ModelCopy]:
        """``hold`` and ``release`` around one request."""
        if not self.hold():
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        try:
            yield self
        finally:
            self.release()

    def unload(self) -> bool:
        """Free the copy now, or, if requests still hold it, when the last of them is done. Returns whether
        the free waits for them."""
        deferred = self.mark_unloaded()
        if not deferred:
            self.free()
        return deferred

    def mark_unloaded(self) -> bool:
        """The quick half of ``unload``: tell ``on_unload`` and decide whether the free waits for the requests
        that hold the copy (True) or is the caller's to do now, with ``free`` (False)."""
        callback, self.on_unload = self.on_unload, None
        with self._state_lock:
            deferred = self._in_use > 0
            if deferred:
                self._unload_pending = True
            else:
                self._freed = True
        if callback is not None:
            callback(deferred)
        return deferred

    def revive(self) -> bool:
        """Keep a copy whose unload still waits for its requests, because a new request wants it: True if its
        weights are still there and now stay (no second copy is loaded)."""
        with self._state_lock:
            if self._freed or not self._unload_pending:
                return False
            self._unload_pending = False
        # Serve's LRU replaces an evicted model's __del__ with a no-op taking one argument
        # (ray/serve/multiplex.py, unload_model_lru); the next eviction must call the real one again.
        vars(self).pop("__del__", None)
        return True

    def free_soon(self) -> None:
        """Free in a worker thread when called on an event loop (gc.collect can take a while)."""
        try:
            future = asyncio.get_running_loop().run_in_executor(None, self.free)
        except RuntimeError:  # no event loop here
            self.free()
            return
        future.add_done_callback(
            lambda f: f.exception() and logger.error("freeing model %r failed: %r", self.spec.id, f.exception())
        )

    def free(self) -> None:
        """Drop the weights and give their memory back (slow: call it off the event loop)."""
        with self._state_lock:
            thread, self._thread = self._thread, None
            runtime, self._runtime = self._runtime, None
        if thread is not None:
            thread.shutdown(wait=False)  # a finaliser may run free on it: the thread ends once free returns
        if runtime is None:
            return
        try:
            with runtime_code("unload()"):
                runtime.unload()
        except Exception:  # its references go with the runtime below, whatever its unload did
            logger.exception("unloading model %r raised; its runtime is dropped", self.spec.id)
        finally:
            del runtime
            gc.collect()
            trim_memory()
            if self.device.startswith("cuda"):  # untested here: no GPU on the machines this was built on
                import torch

                torch.cuda.empty_cache()
            self.released.set()
            callback, self.on_released = self.on_released, None
            if callback is not None:
                callback()
        logger.info("unloaded model %r", self.spec.id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finaliser
            self.unload()
