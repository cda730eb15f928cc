"""The model registry: which models exist, what they do, and where their files are.

The registry is a JSON file (``config/models.json`` by default)::

    {"models": [
        {"id": "sentiment", "task": "text-classification",
         "source": {"path": "models/sentiment"},
         "description": "...", "labels": ["negative", "positive"]},
        {"id": "distilbert-sst2", "task": "text-classification",
         "source": {"hub_id": "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                    "revision": "714eb0fa89d2f80546fda750413ed43d93601a13"}}
    ]}

``task`` names a task of the app's task catalog (``serve_app.core.tasks``: the shipped tasks unless the
app's args name others), and ``runtime`` optionally a runtime class (``package.module:Class``) from a
module the app's args allow. A bad file is rejected with a message that names the offending field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serve_app.core.errors import ModelNotFound, echo, field_path
from serve_app.core.paths import resolve_project_path
from serve_app.core.tasks import TaskCatalog


def _catalog(info: ValidationInfo) -> TaskCatalog:
    """The catalog a registry is checked against: the validation context's, else the shipped tasks."""
    catalog = (info.context or {}).get("catalog")
    return catalog if catalog is not None else TaskCatalog.load()


def _budget(info: ValidationInfo) -> int | None:
    """The bytes a worker replica's models may take, as the registry is checked (None: no budget)."""
    return (info.context or {}).get("budget_bytes")


class LocalSource(BaseModel):
    """A folder in ``save_pretrained`` format; a relative path is relative to the project root. Read from a
    registry, it must lie under the app's model roots (``TaskCatalog.check_path``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)

    def reference(self) -> tuple[str, str | None]:
        return str(resolve_project_path(self.path)), None

    def describe(self) -> str:
        return self.path


class HubSource(BaseModel):
    """A Hugging Face hub repository, pinned to a commit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hub_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")
    revision: str = Field(
        pattern=r"^[0-9a-f]{40}$",
        description="the full 40-character commit hash: a branch or tag can move, a commit cannot",
    )

    def reference(self) -> tuple[str, str | None]:
        """The hub id and the commit. ``ValueError`` where the id also names a file or folder of the working
        directory: transformers would load that folder instead (whatever the revision), a way around the
        model roots."""
        if os.path.lexists(self.hub_id):
            raise ValueError(
                f"hub_id {self.hub_id!r} also names a folder of the server, which would be read instead of the "
                "hub's files: a model in a folder is a source.path under the model roots"
            )
        return self.hub_id, self.revision

    def describe(self) -> str:
        return f"{self.hub_id}@{self.revision}"


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    task: str = Field(description="a task of the app's task modules (args.tasks)")
    source: Annotated[LocalSource | HubSource, Field(union_mode="left_to_right")]
    description: str = ""
    labels: list[str] = Field(default_factory=list)
    preload: bool = Field(False, description="load when a worker replica starts (at most two per replica)")
    runtime: str | None = Field(
        None,
        description="the runtime class, package.module:Class, from a module of args.runtime_modules or of a "
        "task module (default: the task's own)",
    )
    parameters: dict[str, JsonValue] = Field(
        default_factory=dict, description="settings the runtime reads (each runtime documents its own)"
    )
    memory_bytes: int | None = Field(
        None,
        gt=0,
        description="the memory one loaded copy takes, as expected before its first load (replicas measure it "
        "at load); more than a worker replica's model budget is refused",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str, info: ValidationInfo) -> str:
        problem = _catalog(info).check_task(task)
        if problem:
            raise PydanticCustomError("unknown_task", problem)
        return task

    @field_validator("source")
    @classmethod
    def _under_the_model_roots(cls, source: LocalSource | HubSource, info: ValidationInfo) -> LocalSource | HubSource:
        # Checked for every entry read from a registry (Registry.from_dict passes a context); a spec built in
        # code (tests, internals) has none.
        read = isinstance(source, LocalSource) and info.context is not None
        problem = read and _catalog(info).check_path(source.path)
        if problem:
            raise PydanticCustomError("path_outside_model_roots", problem)
        return source

    @field_validator("runtime")
    @classmethod
    def _allowed_runtime(cls, runtime: str | None, info: ValidationInfo) -> str | None:
        problem = runtime and _catalog(info).check_runtime(runtime)
        if problem:
            raise PydanticCustomError("runtime_not_allowed", problem)
        return runtime

    @field_validator("memory_bytes")
    @classmethod
    def _fits(cls, size: int | None, info: ValidationInfo) -> int | None:
        budget = _budget(info)
        if size is not None and budget is not None and size > budget:
            raise PydanticCustomError(
                "over_budget",
                "a copy of {size} bytes can never be loaded: a worker replica's models may take {budget} bytes "
                "(worker.memory_bytes less worker.baseline_bytes)",
                {"size": size, "budget": budget},
            )
        return size


MAX_ERRORS_SHOWN = 20
"""The errors a refused registry's message lists (one line each), then how many more: the message is kept
on every replica and shown by ``GET /models`` and ``make reload``."""


class RegistryError(ValueError):
    """The registry file is missing, not JSON, or does not match the schema."""


def _format_validation_error(origin: str, err: ValidationError, data: object = None) -> str:
    """One line per bad field; a field of an entry whose id can be read names that id too, at the end."""
    entries = data.get("models") if isinstance(data, dict) else None

    def entry_id(loc: tuple) -> str:
        if len(loc) < 2 or loc[0] != "models" or not isinstance(loc[1], int) or not isinstance(entries, list):
            return ""
        entry = entries[loc[1]] if loc[1] < len(entries) else None
        model_id = entry.get("id") if isinstance(entry, dict) else None
        return f" (model {echo(model_id)})" if isinstance(model_id, str) and model_id else ""

    errors = err.errors()
    lines = [
        f"{origin}: {field_path(e['loc']) if e['loc'] else '(root)'}: {e['msg']}{entry_id(e['loc'])}"
        for e in errors[:MAX_ERRORS_SHOWN]
    ]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"{origin}: and {len(errors) - MAX_ERRORS_SHOWN} more errors")
    return "\n".join(lines)


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec] = Field(min_length=1)
    _by_id: dict[str, ModelSpec] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: object) -> None:
        self._by_id = {spec.id: spec for spec in self.models}

    @model_validator(mode="after")
    def _unique_ids(self) -> Registry:
        seen: set[str] = set()
        for i, spec in enumerate(self.models):
            if spec.id in seen:
                raise ValueError(f"models.{i}.id: duplicate model id {spec.id!r}")
            seen.add(spec.id)
        return self

    @classmethod
    def from_dict(
        cls, data: object, origin: str = "registry", catalog: TaskCatalog | None = None, budget_bytes: int | None = None
    ) -> Registry:
        """The registry ``data`` holds, checked against ``catalog`` (default: the shipped tasks) and a worker
        replica's model budget (declared sizes above it are refused)."""
        try:
            return cls.model_validate(data, context={"catalog": catalog, "budget_bytes": budget_bytes})
        except ValidationError as e:
            raise RegistryError(_format_validation_error(origin, e, data)) from None

    @classmethod
    def from_file(
        cls, path: str | Path, catalog: TaskCatalog | None = None, budget_bytes: int | None = None
    ) -> Registry:
        return read_registry_file(path, catalog, budget_bytes)[1]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    def get(self, model_id: str) -> ModelSpec:
        spec = self._by_id.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id, self.ids)
        return spec


def read_registry_file(
    path: str | Path, catalog: TaskCatalog | None = None, budget_bytes: int | None = None
) -> tuple[object, Registry]:
    """A registry file's content and the registry it holds; ``RegistryError`` if the file is missing, is
    not JSON, or does not match the schema (each message starts with the path as given, then the field)."""
    p = resolve_project_path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{p}: registry file not found") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{p}: not valid JSON: {e}") from None
    return data, Registry.from_dict(data, origin=str(path), catalog=catalog, budget_bytes=budget_bytes)
