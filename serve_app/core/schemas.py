"""The types that cross between the ingress and the worker replicas.

The ingress sends a worker decoded inputs and gets a ``WorkerResult`` back; each worker replica reports
its own view of its models as a ``ReplicaStatus``, and every replica the registry it runs as a
``RegistryStatus``. The protocol bodies (native and Open Inference
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
    load_failures: int = 0
    retry_after: float | None = None  # a failed load is not tried again before this time


class ReplicaCounters(BaseModel):
    """What one worker replica has done since it started."""

    requests: int = Field(0, description="prediction requests taken")
    requests_cancelled: int = Field(0, description="requests cancelled while they ran (timeout, client gone)")
    batches: int = Field(0, description="batched model calls")
    largest_batch: int = Field(0, description="most requests in one batched model call")
    evicted_in_use: int = Field(0, description="LRU evictions of a model that requests still held")
    revived: int = Field(0, description="evicted models taken back by a new request before they were freed")
    refused_in_backoff: int = Field(0, description="requests answered 503 from a failed load's back-off")
    live_models: int = Field(0, description="models whose weights are in memory now (held or still in use)")


class RefusedRegistry(BaseModel):
    """A registry change a replica refused; it kept the registry it had."""

    version: str = Field(description="the refused registry's content hash")
    message: str = Field(description="why: each problem with the field it names, as at start-up")
    at: float = Field(description="Unix time of the refusal")


class RegistryStatus(BaseModel):
    """The registry one replica runs."""

    version: str | None = Field(None, description="content hash of the registry in force")
    applied_at: float | None = Field(None, description="Unix time this replica applied it")
    models: int = Field(0, description="models in it")
    refused: RefusedRegistry | None = Field(None, description="the last change refused since it was applied")


class ReplicaStatus(BaseModel):
    """What one worker replica reports about the models it has seen."""

    replica_id: str
    node_id: str | None = None
    registry: RegistryStatus | None = None
    models: dict[str, ReplicaModelStatus] = Field(default_factory=dict)
    counters: ReplicaCounters = Field(default_factory=ReplicaCounters)

    @property
    def held(self) -> list[str]:
        """The models this replica holds or is loading now."""
        return sorted(m for m, s in self.models.items() if s.state in (ModelState.LOADED, ModelState.LOADING))
