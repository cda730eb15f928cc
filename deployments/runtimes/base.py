"""The runtime interface: one small class per task, each wrapping a transformers pipeline.

A runtime is created for one registry entry, then ``load`` reads the model
(the same code for a local folder and for a pinned hub revision),
``predict`` answers a batch of inputs, and ``unload`` drops every reference to the weights so that their memory is
freed. Ray Serve's multiplexing LRU calls ``__del__`` on eviction, which is
``unload`` here. A model evicted while requests (or a batch) still run on it is released
when the last of them finishes (``in_use``), so those requests complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ClassVar

from serve_app.core.registry import ModelSpec, Task
from serve_app.core.schemas import LabelScore, Scores

logger = logging.getLogger("ray.serve")

# Most inputs in one forward pass (a batch of requests times their list inputs can be larger).
MAX_FORWARD_BATCH = 32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelRuntime(ABC):
    task: ClassVar[Task]

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        if spec.task is not self.task:
            raise ValueError(f"{type(self).__name__} serves {self.task.value}, not {spec.task.value}")
        self.spec = spec
        self.device = device or default_device()
        self.load_seconds: float | None = None
        self._state_lock = threading.Lock()
        self._in_use = 0
        self._unload_pending = False  # unloaded while requests held it: freed when the last one is done
        self._freed = False
        self._thread: ThreadPoolExecutor | None = None
        # Told once when the model is unloaded, with whether its free waits for requests still holding it.
        self.on_unload: Callable[[bool], None] | None = None

    @property
    @abstractmethod
    def loaded(self) -> bool: ...

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    @abstractmethod
    def predict(self, inputs: list[Any]) -> list[Scores]:
        """One list of label scores per input, in input order."""

    def prepare(self, inputs: list[Any]) -> list[Any]:
        """One request's inputs as the model takes them, before they join a batch (the worker calls it in
        a thread when a runtime overrides it). An input the model cannot take raises a ServeAppError here,
        which fails its own request and no other."""
        return inputs

    @property
    def thread(self) -> ThreadPoolExecutor:
        """The one thread this copy of the model runs its batches on (the worker calls ``predict`` there), so
        that every forward pass finds the same thread's allocator arena and torch state, where asyncio's
        shared pool hands each call to whichever of its threads takes it. Measured in one process, the demo
        sentiment model with an 8 ms gap before each call: 12.09 ms on one thread against 12.53 through the
        shared pool (7 of 8 rounds ahead); the app's figures are in docs/performance.md. Another model copy
        has a thread of its own, so two models' batches still run at once. ``free`` ends it (after the pass
        running on it, if any)."""
        with self._state_lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"model-{self.spec.id}")
            return self._thread

    def load(self) -> ModelRuntime:
        t0 = time.perf_counter()
        self._load()
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded model %r on %s in %.2fs", self.spec.id, self.device, self.load_seconds)
        return self

    def hold(self) -> bool:
        """Hold the model for one request (or one batch), so that an unload meanwhile waits until ``release``.
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
            self._free_soon()

    @contextmanager
    def in_use(self) -> Iterator[ModelRuntime]:
        """``hold`` and ``release`` around one request."""
        if not self.hold():
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        try:
            yield self
        finally:
            self.release()

    def unload(self) -> bool:
        """Drop the weights now, or, if requests still hold the model, when the last of them is done.
        Returns whether the free waits for them."""
        deferred = self.mark_unloaded()
        if not deferred:
            self.free()
        return deferred

    def mark_unloaded(self) -> bool:
        """The quick half of ``unload``: tell ``on_unload`` and decide whether the free waits for the requests
        that hold the model (True) or is the caller's to do now, with ``free`` (False)."""
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
        """Keep a model whose unload still waits for its requests, because a new request wants it: True if
        its weights are still there and now stay (no second copy is loaded)."""
        with self._state_lock:
            if self._freed or not self._unload_pending:
                return False
            self._unload_pending = False
        # Serve's LRU replaces an evicted model's __del__ with a no-op taking one argument
        # (ray/serve/multiplex.py, unload_model_lru); the next eviction must call the real one again.
        vars(self).pop("__del__", None)
        return True

    def _free_soon(self) -> None:
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
        """Drop the weights (slow: it runs the garbage collector; call it off the event loop)."""
        with self._state_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=False)  # a finaliser may run free on it: the thread ends once free returns
        if not self.loaded:
            return
        self._release()
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        logger.info("unloaded model %r", self.spec.id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finaliser
            self.unload()


class PipelineRuntime(ModelRuntime):
    """A runtime backed by ``transformers.pipeline`` for its task."""

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        super().__init__(spec, device)
        self._pipeline: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def _load(self) -> None:
        from transformers import pipeline

        model, revision = self.spec.source.reference()
        self._pipeline = pipeline(
            task=self.task.value,
            model=model,
            revision=revision,
            trust_remote_code=False,
            device=self.device,
        )

    def _release(self) -> None:
        self._pipeline = None

    @contextmanager
    def _pipeline_in_use(self) -> Iterator[Any]:
        """The pipeline, for one call at a time."""
        pipe = self._pipeline  # a local reference: an eviction during the call does not break it
        if pipe is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        with self._lock:  # a pipeline is not safe to call from several threads at once
            yield pipe

    @staticmethod
    def _forward_batch(pipe: Any) -> int:
        """Most inputs in one forward pass: MAX_FORWARD_BATCH, or one for a tokenizer without a pad token,
        which cannot pad a batch."""
        tokenizer = getattr(pipe, "tokenizer", None)
        return MAX_FORWARD_BATCH if tokenizer is None or tokenizer.pad_token_id is not None else 1

    def _run(self, inputs: list[Any]) -> list[Scores]:
        with self._pipeline_in_use() as pipe:
            # batch_size: one forward pass for the inputs (a pipeline's default runs them one by one,
            # 2.7x slower per sentence for the demo text models on one CPU thread).
            out = pipe(inputs, top_k=None, batch_size=min(len(inputs), self._forward_batch(pipe)))
        # A single input gives a flat list of {label, score}; normalise to one list per input.
        if out and isinstance(out[0], dict):
            out = [out]
        return [
            sorted((LabelScore(label=d["label"], score=float(d["score"])) for d in row), key=lambda s: -s.score)
            for row in out
        ]
