"""Tasks: the unit of extension. A task is one module that the app is configured with.

A task module (the shipped ones are in ``deployments/tasks/``) defines ``TASK``, a ``Task`` that declares

* its name, which registry entries name (``"task": "feature-extraction"``);
* its input kind (``serve_app.core.inputs``): how a request's inputs are decoded and bounded;
* its output kind (``serve_app.core.outputs``): how a runtime's answer is encoded between the replicas,
  and shaped for the native API and the Open Inference Protocol, with the v2 metadata that describes it;
* its runtime classes (subclasses of ``deployments.runtimes.ModelRuntime``), the first one the default;
* the parameters a request may give, if any (``parameters``: feature-extraction's ``prompt_name``), which
  its runtimes' ``predict`` takes.

The app's args name the task modules (``tasks``, the shipped ones by default) and the modules from which
a registry entry may name a runtime class of its own (``runtime_modules``): ``TaskCatalog`` is what they
make. The registry selects a task by name from the catalog and may choose a runtime class
(``"runtime": "package.module:Class"``) among the task modules' and the allowed modules' classes only:
the registry changes live (``make reload``), so it may choose among the classes the operator allowed, but
never widen the list. The same holds for where a registry entry's local source may lie: under the
operator's model roots (``model_roots``), never elsewhere on the machine.

Nothing here imports a task module by name at import time: the catalog imports the configured modules when
it is built, in every process that needs it (the ingress, the worker replicas, the registry check).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from serve_app.core.config import MODEL_ROOTS, SHIPPED_TASKS
from serve_app.core.errors import InvalidInput, echo, first_invalid
from serve_app.core.inputs import InputKind
from serve_app.core.outputs import OutputKind
from serve_app.core.paths import resolve_project_path

if TYPE_CHECKING:
    from serve_app.core.registry import ModelSpec

MAX_MODEL_FILES = 10_000
"""The most files and folders of one model folder that a load checks for links out of the model roots."""
RUNTIME_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""``package.module:Class``."""


@dataclass(frozen=True)
class Task:
    """What a task module declares (as ``TASK``)."""

    name: str
    input: InputKind
    output: OutputKind
    runtimes: tuple[type, ...]
    description: str = ""
    platform: str = field(default="transformers", compare=False)
    """v2 model metadata's ``platform`` of the default runtime (``<platform>/<task>``)."""
    parameters: type[BaseModel] | None = None
    """The parameters a request may give (a pydantic model, extra fields forbidden), which its runtimes'
    ``predict`` takes as keyword arguments (requests with other values are never in one model call), but
    those its output kind applies itself (``OutputKind.options``: classification's ``top_k``). None: the task
    takes none."""

    def __post_init__(self) -> None:
        """Each field of the kind it must be, checked when the task module is imported (the app does not start
        with it), not at each request (a class where an instance belongs would fail every one of them)."""
        for what, value, kind in (("input", self.input, InputKind), ("output", self.output, OutputKind)):
            if not isinstance(value, kind):
                hint = f" (a class: write {value.__name__}())" if isinstance(value, type) else ""
                raise TaskConfigError(f"task {self.name!r}: its {what} must be an instance of {kind.__name__}{hint}")
        if not self.runtimes:
            raise TaskConfigError(f"task {self.name!r} names no runtime class")
        if not isinstance(self.runtimes, list | tuple) or not all(isinstance(cls, type) for cls in self.runtimes):
            raise TaskConfigError(f"task {self.name!r}: its runtimes must be classes, in a tuple or a list")
        object.__setattr__(self, "runtimes", tuple(self.runtimes))  # frozen: hashable, as a tuple
        if self.parameters is not None and not (
            isinstance(self.parameters, type) and issubclass(self.parameters, BaseModel)
        ):
            raise TaskConfigError(f"task {self.name!r}: its parameters must be a pydantic model class, or None")

    def request_parameters(self, given: Mapping[str, Any] | None, others: bool = False) -> dict[str, Any]:
        """A request's parameters for this task, checked (InvalidInput naming the field), without those left
        at their defaults: ``{}`` for none. ``others``: the protocol has parameters of its own (v2's
        ``timeout``, Triton's), so the ones this task does not take are left to it, not refused."""
        if not given:
            return {}
        fields = self.parameters.model_fields if self.parameters is not None else {}
        if others:
            given = {k: v for k, v in given.items() if k in fields}
        unknown = next((k for k in given if k not in fields), None)
        if unknown is not None:
            takes = ", ".join(fields) or "none"
            where = f"parameters.{echo(unknown, quote=False)}"
            raise InvalidInput(
                f"{where}: a model of task {self.name} takes no such parameter (it takes: {takes})", field=where
            )
        if not given or self.parameters is None:
            return {}
        try:
            checked = self.parameters.model_validate(dict(given))
        except ValidationError as e:
            raise first_invalid(e, within="parameters") from None
        return checked.model_dump(mode="json", exclude_defaults=True)  # plain values, sent to the worker

    @property
    def default_runtime(self) -> str:
        return runtime_path(self.runtimes[0])


def runtime_path(cls: type) -> str:
    """A class as a registry entry names it: ``package.module:Class``."""
    return f"{cls.__module__}:{cls.__qualname__}"


class TaskConfigError(ValueError):
    """A task module named in the app's args is missing, or declares no valid ``TASK``: the app does not start."""


class RuntimeImportError(ImportError):
    """A runtime class a registry entry names cannot be imported (a load failure: 503, never a 500)."""


class TaskCatalog:
    """The tasks the app serves, by name, and the modules runtime classes may come from."""

    def __init__(
        self,
        tasks: Iterable[Task],
        runtime_modules: Iterable[str] = (),
        model_roots: Iterable[str] = MODEL_ROOTS,
        task_modules: Iterable[str] = (),
    ) -> None:
        """A registry entry may name a runtime class from a module of ``runtime_modules``, from one of the task
        modules (``task_modules``: those that declared ``tasks``), or from a module that defines one of their
        runtime classes (a task module may import its runtimes from another), by the module's exact name."""
        self.model_roots = tuple(resolve_project_path(root).resolve() for root in model_roots)
        self._tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self._tasks:
                raise TaskConfigError(f"two task modules declare the task {task.name!r}")
            self._tasks[task.name] = task
        self.runtime_modules = frozenset(runtime_modules)
        runtimes_defined_in = {cls.__module__ for t in self._tasks.values() for cls in t.runtimes}
        self._allowed = self.runtime_modules | frozenset(task_modules) | runtimes_defined_in

    @classmethod
    def load(
        cls,
        modules: Sequence[str] = SHIPPED_TASKS,
        runtime_modules: Sequence[str] = (),
        model_roots: Sequence[str] = MODEL_ROOTS,
    ) -> TaskCatalog:
        """The catalog of the named task modules (imported once per process)."""
        return _load(tuple(modules), tuple(runtime_modules), tuple(model_roots))

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def get(self, name: str) -> Task:
        return self._tasks[name]

    def task_of(self, spec: ModelSpec) -> Task:
        return self._tasks[spec.task]

    def check_task(self, name: str) -> str | None:
        """Why a registry entry may not name this task, or None."""
        if name in self._tasks:
            return None
        return f"unknown task {name!r}: this app serves {', '.join(repr(n) for n in self._tasks)} (args.tasks)"

    def check_runtime(self, path: str) -> str | None:
        """Why a registry entry may not name this runtime class, or None. Only the module is checked here;
        the class is imported when a replica loads the model."""
        if not RUNTIME_PATH.fullmatch(path):
            return f"{path!r} is not of the form package.module:Class"
        module = path.partition(":")[0]
        if module not in self._allowed:
            allowed = ", ".join(sorted(self.runtime_modules)) or "none"
            return (
                f"runtime {path!r}: module {module!r} is not in args.runtime_modules, the modules the operator "
                f"allows runtime classes from (now: {allowed}; and the task modules)"
            )
        return None

    def check_path(self, path: str) -> str | None:
        """Why a registry entry's local source may not be this folder, or None: it must lie under one of the
        model roots once resolved (``..`` and symlinks included), so that a registry, which changes live,
        cannot point a replica at any other folder of the machine."""
        try:
            resolved = resolve_project_path(path).resolve()
        except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL character
            return f"path {echo(path)} cannot be resolved"
        if any(resolved.is_relative_to(root) and resolved != root for root in self.model_roots):
            return None
        return (
            f"path {echo(path)} is outside the model roots, the folders the operator allows models from "
            "(args.model_roots)"
        )

    def check_files(self, path: str) -> str | None:
        """Why a model folder may not be loaded, or None: the folder, and every link among its files and
        subfolders, must resolve under the model roots (a folder under a root whose files link out of it would
        read them from anywhere). Links to folders are followed, each folder read once; a folder that cannot
        be listed, or more than ``MAX_MODEL_FILES`` entries in all, refuse the load."""
        if problem := self.check_path(path):
            return problem
        folder = resolve_project_path(path).resolve()
        if not folder.is_dir():  # a single file, checked above; or none there, which the load reports
            return None
        seen, visited = 0, {folder}

        def unreadable(error: OSError) -> None:
            raise error

        try:
            for parent, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
                for name in (*dirs, *files):
                    seen += 1
                    if seen > MAX_MODEL_FILES:
                        return f"path {echo(path)} holds more than {MAX_MODEL_FILES} files and folders"
                    entry = Path(parent) / name
                    if entry.is_symlink() and self.check_path(str(entry)):
                        link = echo(str(entry.relative_to(folder)))
                        return f"path {echo(path)} has a link out of the model roots: {link}"
                unseen = [d for d in dirs if (Path(parent) / d).resolve() not in visited]
                visited.update((Path(parent) / d).resolve() for d in unseen)
                dirs[:] = unseen  # a folder reached twice (by a link) is walked once: no loop
        except OSError as e:
            return f"path {echo(path)} has a folder that cannot be listed: {type(e).__name__}"
        return None

    def runtime_of(self, spec: ModelSpec) -> str:
        """The runtime class a model runs on: its entry's, or its task's default."""
        return spec.runtime or self.task_of(spec).default_runtime

    def runtime_class(self, spec: ModelSpec) -> type:
        """The runtime class of a model, imported (``RuntimeImportError`` if it cannot be)."""
        path = self.runtime_of(spec)
        problem = self.check_runtime(path)
        if problem:  # the registry was checked against this catalog: only a catalog changed since gets here
            raise RuntimeImportError(problem)
        module_name, _, name = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise RuntimeImportError(
                f"runtime {path!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
            ) from None
        cls: Any = getattr(module, name, None)
        if not isinstance(cls, type):
            raise RuntimeImportError(
                f"runtime {path!r}: module {module_name!r} has no class {name!r} (a replica imports a module once: "
                "a class added since reaches it when it restarts)"
            )
        return cls


@functools.cache
def _load(modules: tuple[str, ...], runtime_modules: tuple[str, ...], model_roots: tuple[str, ...]) -> TaskCatalog:
    tasks = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # not found, or its own code failed (a SyntaxError, a setting it lacks): the args' fault
            reason = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
            raise TaskConfigError(f"task module {name!r} cannot be imported: {reason}") from None
        task = getattr(module, "TASK", None)
        if not isinstance(task, Task):
            raise TaskConfigError(f"task module {name!r} defines no TASK (a serve_app.core.tasks.Task)")
        tasks.append(task)
    return TaskCatalog(tasks, runtime_modules, model_roots, task_modules=modules)
