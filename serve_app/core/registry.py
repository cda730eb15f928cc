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

A bad file is rejected with a message that names the offending field.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from serve_app.core.errors import ModelNotFound, field_path
from serve_app.core.paths import resolve_project_path


class Task(str, Enum):
    TEXT_CLASSIFICATION = "text-classification"
    IMAGE_CLASSIFICATION = "image-classification"

    @property
    def modality(self) -> Modality:
        return _MODALITY[self]


class Modality(str, Enum):
    TEXT = "text"
    IMAGE = "image"


_MODALITY = {Task.TEXT_CLASSIFICATION: Modality.TEXT, Task.IMAGE_CLASSIFICATION: Modality.IMAGE}


class LocalSource(BaseModel):
    """A folder in ``save_pretrained`` format; a relative path is relative to the project root."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)

    def reference(self) -> tuple[str, str | None]:
        return str(resolve_project_path(self.path)), None

    def describe(self) -> str:
        return self.path


class HubSource(BaseModel):
    """A Hugging Face hub repository, pinned to a commit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hub_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    revision: str = Field(
        pattern=r"^[0-9a-f]{40}$",
        description="the full 40-character commit hash: a branch or tag can move, a commit cannot",
    )

    def reference(self) -> tuple[str, str | None]:
        return self.hub_id, self.revision

    def describe(self) -> str:
        return f"{self.hub_id}@{self.revision}"


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    task: Task
    source: Annotated[LocalSource | HubSource, Field(union_mode="left_to_right")]
    description: str = ""
    labels: list[str] = Field(default_factory=list)
    preload: bool = Field(False, description="load when a worker replica starts (at most two per replica)")

    @property
    def modality(self) -> Modality:
        return self.task.modality


class RegistryError(ValueError):
    """The registry file is missing, not JSON, or does not match the schema."""


def _format_validation_error(origin: str, err: ValidationError) -> str:
    return "\n".join(f"{origin}: {field_path(e['loc']) if e['loc'] else '(root)'}: {e['msg']}" for e in err.errors())


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
    def from_dict(cls, data: object, origin: str = "registry") -> Registry:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RegistryError(_format_validation_error(origin, e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Registry:
        return read_registry_file(path)[1]

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


def read_registry_file(path: str | Path) -> tuple[object, Registry]:
    """A registry file's content and the registry it holds; ``RegistryError`` if the file is missing, is
    not JSON, or does not match the schema (each message starts with the path as given, then the field)."""
    p = resolve_project_path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{p}: registry file not found") from None
    except json.JSONDecodeError as e:
        raise RegistryError(f"{p}: not valid JSON: {e}") from None
    return data, Registry.from_dict(data, origin=str(path))
