"""The types that cross between the ingress and the worker replicas, and the worker's calls.

The ingress calls a worker replica's methods (``WorkerCall``) with decoded inputs and gets a
``WorkerResult`` back: the request's answer as named arrays, in its task's output kind
(``serve_app.core.outputs``). Each worker replica reports its own view of its models as a
``ReplicaStatus`` (Serve's controller polls it for the routers; ``GET /models`` reads it), and every
replica the registry it runs as a ``RegistryStatus``. The protocol bodies (native and Open Inference
Protocol) are built from these in ``deployments.ingress.protocols``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydantic import BaseModel, Field


class WorkerCall(str, Enum):
    """The worker deployment's methods the ingress calls (``handle.<method>.remote``)."""

    PREDICT = "predict"
    LOAD = "load"
    UNLOAD = "unload"
    STATUS = "status"


ON_REPLICA = "on_replica"
"""The keyword argument of a worker call that names the one replica it is for (unload, status): the router
sends it there and nowhere else."""
ROUTE = "route"
"""The keyword argument of a predict or load call that the router sets to the ``RouteHint`` of the replica it
sends the call to."""
DECLARED_BYTES = "declared_bytes"
"""The keyword argument of a predict or load call that carries the model's size as its registry entry
declares it (the router's estimate before any replica has measured it)."""


@dataclass(frozen=True)
class RouteHint:
    """What the router tells the replica it sends a request to: what it knows that the replica does not."""

    replica_id: str  # the replica it was chosen for (Serve may send the request to another group's replica)
    evict: tuple[str, ...] = ()  # a miss: the copies to evict there first, the set of least worth (policy.eviction)
    size_bytes: int | None = None  # the request's model's size as the router knows it (measured, or declared)
    threads: int | None = None  # the replica and its node are idle: its forward pass may use this many threads


@dataclass(frozen=True)
class WorkerResult:
    """A worker's answer to one request: its task's output arrays (``OutputKind.encode``) for its inputs, and
    whether the request had to load its model (the replica's models changed)."""

    outputs: dict[str, np.ndarray]
    loaded: bool = False


class ModelState(str, Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class IdleThreadsReport(BaseModel):
    """How a model copy's lone requests on an idle node ran, on the replica's own threads and on the node's
    idle threads as well (deployments/worker/threads.py): milliseconds per input, medians of the newest."""

    lone_batches: int = Field(0, description="lone batches offered the idle threads and measured")
    on_idle_threads: int = Field(0, description="of those, the batches that ran on the idle threads")
    own_threads_ms: float | None = Field(None, description="on the replica's own threads")
    idle_threads_ms: float | None = Field(None, description="on the node's idle threads")
    uses_idle_threads: bool | None = Field(
        None, description="whether such a batch now runs on the idle threads (null: still in its trials)"
    )


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
    request_failures: int = 0  # requests its code failed once loaded (errors.ModelFailed: 503)
    last_request_error: str | None = None  # the newest of them, as its client read it
    last_request_error_at: float | None = None
    size_bytes: int | None = None  # what a copy takes: its weights, else the growth of resident memory at load
    weights_bytes: int | None = None  # the loaded copy's weights and buffers, exactly, as its runtime reports
    rss_growth_bytes: int | None = None  # how much the replica's resident memory grew while the copy loaded
    idle_threads: IdleThreadsReport | None = None  # the loaded copy's lone requests, by thread count
    packed_batches: int | None = None  # the loaded copy's forward passes run packed (None: it runs them padded)


class ReplicaCounters(BaseModel):
    """What one worker replica has done since it started."""

    requests: int = Field(0, description="prediction requests taken")
    requests_cancelled: int = Field(0, description="requests cancelled while they ran (timeout, client gone)")
    batches: int = Field(0, description="batched model calls")
    largest_batch: int = Field(0, description="most requests in one batched model call")
    evicted_in_use: int = Field(0, description="LRU evictions of a model that requests still held")
    revived: int = Field(0, description="evicted models taken back by a new request before they were freed")
    refused_in_backoff: int = Field(0, description="requests answered 503 from a failed load's back-off")
    load_timeouts: int = Field(
        0, description="loads that did not finish within worker.load_timeout_s (failed; freed once they return)"
    )
    live_models: int = Field(0, description="models whose weights are in memory now (held or still in use)")
    evicted_by_lru: int = Field(
        0,
        description="copies evicted, least recently used first, for room by count: by Ray's LRU, or by the "
        "replica's load while a copy evicted in use still lingers",
    )
    evicted_by_router: int = Field(0, description="copies evicted because the router chose them for a miss")
    router_victim_not_lru: int = Field(
        0, description="of those, the copies Ray's LRU would not have chosen (the router's choice differed)"
    )
    evicted_for_memory: int = Field(0, description="copies this replica evicted to keep a load within its budget")
    refused_over_budget: int = Field(0, description="loads refused: the model is larger than the whole budget")
    waited_for_memory: int = Field(0, description="loads that waited for copies still in use to be freed")
    idle_thread_offers: int = Field(
        0,
        description="batches of a lone request on an idle node, offered by the router more threads than the "
        "replica's own (at most the machine's cores)",
    )
    extra_thread_batches: int = Field(
        0,
        description="of those, the batches run with the node's idle threads as well (where they were measured "
        "faster, and in the trials that measure them)",
    )
    most_threads: int = Field(0, description="the most intra-op threads a batch has run with")
    predict_seconds: float = Field(
        0.0, description="time spent on prediction requests in this replica, from each call's start to its answer"
    )
    model_seconds: float = Field(
        0.0,
        description="of that, time the model copies spent on their batches (forward passes and encoding the answers), "
        "summed over batches",
    )
    most_decodes_at_once: int = Field(
        0, description="most requests whose inputs (images) this replica decoded at once (max_concurrent_decodes)"
    )


class ReplicaMemory(BaseModel):
    """A worker replica's memory, in bytes (on the model device: host memory, or CUDA memory on a GPU)."""

    device: str = Field("cpu", description="where its models live")
    budget_bytes: int | None = Field(None, description="what its models may take (null: count only, no budget)")
    used_bytes: int = Field(0, description="what its models take now: the copies it holds, and those still in use")
    lingering_bytes: int = Field(0, description="of those, the copies evicted but not freed yet (requests run on them)")
    baseline_bytes: int | None = Field(None, description="what the replica took before its first model")
    resident_bytes: int | None = Field(None, description="the process's resident memory now")


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
    report: int = Field(0, description="this replica's number for the report: a later report has a larger one")
    at: float | None = Field(None, description="when the replica made the report (Unix time)")
    slots: int = Field(2, description="most models this replica holds at once")
    threads: int = Field(1, description="the intra-op threads its forward passes use under load")
    memory: ReplicaMemory = Field(default_factory=ReplicaMemory)
    registry: RegistryStatus | None = None
    models: dict[str, ReplicaModelStatus] = Field(default_factory=dict)
    counters: ReplicaCounters = Field(default_factory=ReplicaCounters)

    @property
    def held(self) -> list[str]:
        """The models this replica holds or is loading now."""
        return sorted(m for m, s in self.models.items() if s.state in (ModelState.LOADED, ModelState.LOADING))
