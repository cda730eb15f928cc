"""The base of every model runtime: what a model class implements to be served.

A runtime serves one registry entry (``spec``) on one device. The worker replica creates it, calls
``load`` off the event loop, then ``predict`` with batches of inputs, always from the one thread of
that copy of the model, and ``unload`` when Ray's LRU (or an unload, or a registry change) lets the copy
go. Around it the worker does the rest, the same for every runtime: the cap of two models per replica,
batching, holding a copy while requests run on it, measuring its size, and freeing its memory.

A runtime of your own (``"runtime": "package.module:Class"`` in a registry entry, from a module the
operator lists in ``args.runtime_modules``) subclasses ``ModelRuntime``:

* ``load()``: read the model from ``self.spec.source`` (``self.model_files()`` gives a local folder, and
  fails saying so if it is not on this node, or a hub id and revision) and keep it on ``self``;
* ``predict(inputs)``: one row per input, in input order (a list, or an array or tensor whose first axis
  is the inputs), in the form of the task's output kind (a text-classification row is label scores, a
  feature-extraction row a vector, ...: docs/models.md);
  the inputs are what the task's input kind decodes (``str`` for text, encoded image bytes for images,
  after ``prepare``);
* ``unload()``: drop every reference to the model, so that its memory can be freed;
* ``size_bytes()``: the bytes of its weights and buffers, exactly, or None if it cannot tell (the worker
  then counts the growth of the process's resident memory during the load); the default counts the
  parameters and buffers of every torch module among the runtime's attributes.

Optional: ``prepare(inputs)`` turns one request's inputs into one item per input (a list, a tuple or an
array along its first axis), what ``predict`` takes, before they join a batch (in a thread; an input it
cannot take raises a ``ServeAppError``, such as ``InvalidInput`` (422) or ``BadImage`` (400), that fails
its own request only; any other exception, or another number of items, fails it with 503), and ``task``,
the name of the one task the class serves (a registry entry of another task is refused at load).
Exceptions raised by ``load`` make the load fail (the model shows ``failed``, requests get 503 with the
reason; an ``unload`` that then raises is logged, not raised); an exception raised by ``predict`` makes the
worker call it again for each request of the batch alone, so that only the requests at fault fail: with
the status of one of the app's errors (``InvalidInput``: 422), else 503.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from deployments.runtimes.packing import Packing
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import TaskCatalog


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_bytes(*objects: Any) -> int | None:
    """Bytes of the parameters and buffers of the torch modules among ``objects`` (and their ``model``
    attribute: a transformers pipeline's), each tensor counted once; None if none is a torch module."""
    import torch

    modules = [m for o in objects for m in (o, getattr(o, "model", None)) if isinstance(m, torch.nn.Module)]
    if not modules:
        return None
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


class ModelRuntime(ABC):
    """Loads one model and answers batches of inputs for it (see the module's docstring)."""

    task: ClassVar[str | None] = None
    """The one task this class serves, or None for a class that serves whichever task its entry names."""

    entry_parameters: ClassVar[frozenset[str] | None] = None
    """The names of the registry entry's ``parameters`` this class reads: an entry with another one (a misspelt
    ``normalise``) is a failed load that names it, not a model served without it. None: any (not checked)."""

    packing: Packing | None = None
    """Its batches of texts packed without their padding (``deployments.runtimes.packing``): set at load by a
    runtime that packs them (``Packing.checked``), counted in GET /models (``packed_batches``)."""

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = device or default_device()

    def model_files(self) -> tuple[str, str | None]:
        """Where the entry's model is, for ``from_pretrained``: a local folder (``FileNotFoundError`` if it is not
        on this node: transformers would take the path for a hub id, and say so), or a hub id and its commit."""
        where, revision = self.spec.source.reference()
        if revision is None and not os.path.exists(where):
            raise FileNotFoundError(f"no model files at {self.spec.source.describe()!r} (source.path) on this node")
        return where, revision

    @abstractmethod
    def load(self) -> None:
        """Read the model into memory."""

    @abstractmethod
    def predict(self, inputs: list[Any]) -> list[Any]:
        """One row per input, in input order, in the form of the task's output kind. A runtime of a task that
        declares request parameters (``Task.parameters``) takes them as keyword arguments, given only when a
        request set them: ``predict(self, inputs, prompt_name=None)``; a batch's requests share them."""

    def prepare(self, inputs: list[Any]) -> list[Any]:
        """One request's inputs as ``predict`` takes them (called in a thread, before batching)."""
        return inputs

    def unload(self) -> None:  # noqa: B027  (a runtime with nothing to drop need not override it)
        """Drop every reference to the model (the worker then collects garbage and returns memory)."""

    def size_bytes(self) -> int | None:
        """The exact bytes of the model's weights and buffers, or None if this runtime cannot tell."""
        return torch_bytes(*vars(self).values())


CALLED_IN_THREADS = ("load", "predict", "prepare", "unload", "size_bytes")
"""The methods of a runtime the worker calls, each in a thread (never awaited)."""


@contextmanager
def runtime_code(what: str) -> Iterator[None]:
    """Run a runtime's own code (``what`` names it): an exception that is no ``Exception`` (``SystemExit``, as a
    library's command-line parsing raises it, or ``KeyboardInterrupt``) would end the replica's event loop,
    and with it every model on the replica. It is a ``RuntimeError`` instead, which fails the load or the
    request like any other."""
    try:
        yield
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as e:
        raise RuntimeError(f"{what} raised {type(e).__name__}: {e}") from e


def runtime_for(spec: ModelSpec, catalog: TaskCatalog | None = None, device: str | None = None) -> ModelRuntime:
    """A runtime for a registry entry, not loaded yet: the class its entry names, else its task's default,
    from ``catalog`` (default: the shipped tasks). ``TypeError`` for a class that is no ModelRuntime, or that
    serves another task; ``RuntimeImportError`` for one that cannot be imported."""
    catalog = catalog or TaskCatalog.load()
    with runtime_code("importing the runtime's module"):
        cls = catalog.runtime_class(spec)
    if not issubclass(cls, ModelRuntime):
        raise TypeError(f"{catalog.runtime_of(spec)} is not a subclass of deployments.runtimes.ModelRuntime")
    if cls.task is not None and cls.task != spec.task:
        raise TypeError(f"{catalog.runtime_of(spec)} serves {cls.task}, not {spec.task}")
    asynchronous = [
        name
        for name in CALLED_IN_THREADS
        if inspect.iscoroutinefunction(method := getattr(cls, name, None)) or inspect.isasyncgenfunction(method)
    ]
    if asynchronous:
        raise TypeError(
            f"{catalog.runtime_of(spec)}.{asynchronous[0]} is an async def: the worker calls a runtime's methods "
            "in threads of their own, and would get a coroutine that never runs; make it a plain def"
        )
    reads = frozenset(cls.entry_parameters) if cls.entry_parameters is not None else None
    unread = sorted(set(spec.parameters) - reads) if reads is not None else []
    if unread:
        named = ", ".join(sorted(reads)) or "none"
        raise ValueError(
            f"{catalog.runtime_of(spec)} reads no registry parameter {', '.join(map(repr, unread))} (it reads: {named})"
        )
    with runtime_code("the runtime's __init__"):
        return cls(spec, device)
