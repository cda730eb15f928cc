"""The types that cross between the ingress and the worker replicas.

The ingress sends a worker decoded inputs and gets a ``WorkerResult`` back; each worker replica reports
its own view of its models as a ``ReplicaStatus``. The protocol bodies (native and Open Inference
Protocol) are built from these in ``deployments.ingress.protocols``.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    label: str
    score: float


Scores = list[LabelScore]
"""One prediction: every label with its probability, most likely first."""


class WorkerResult(BaseModel):
    """A worker's answer to one request: one prediction per input, in input order."""

    predictions: list[Scores]


class ModelState(str, Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ReplicaModelStatus(BaseModel):
    """One model as one worker replica sees it. Times are Unix seconds."""

    state: ModelState = ModelState.NOT_LOADED
    load_count: int = 0
    unload_count: int = 0
    last_loaded_at: float | None = None
    last_load_seconds: float | None = None
    last_used_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


class ReplicaStatus(BaseModel):
    """What one worker replica reports about the models it has seen."""

    replica_id: str
    node_id: str | None = None
    models: dict[str, ReplicaModelStatus] = Field(default_factory=dict)

    @property
    def held(self) -> list[str]:
        """The models this replica holds or is loading now."""
        return sorted(m for m, s in self.models.items() if s.state in (ModelState.LOADED, ModelState.LOADING))
