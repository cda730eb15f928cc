"""The native protocol (the seed's API): its request and response bodies, and how answers are shaped.

``POST /predict`` takes ``{"model_id", "input_data"}`` and answers one prediction per input, in the form of
the model's task (``serve_app.core.outputs``: label scores, an embedding, a list of entities);
``GET /models`` lists every registered model with its state on the worker replicas, and the registry's
version on every replica.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from deployments.ingress.bodies import check_json_budget, not_json
from deployments.ingress.dataplane import InferenceRequest, InferenceResult, ModelListing, ModelStatus, Readiness
from serve_app.core.schemas import (
    IdleThreadsReport,
    ModelState,
    RefusedRegistry,
    RegistryStatus,
    ReplicaCounters,
    ReplicaMemory,
)

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model_id": "sentiment", "input_data": "This movie was great!"},
                {"model_id": "spam", "input_data": ["Win a free iPhone now!", "See you at lunch"]},
                {"model_id": "image", "input_data": "samples/images/image.jpg"},
                {"model_id": "embed", "input_data": ["A man is eating food.", "Someone is having a meal."]},
                {"model_id": "ner", "input_data": "Alice Martin flew from Paris to meet Globex."},
            ]
        }
    )

    model_id: NonEmptyStr = Field(description="id of a model in the registry (GET /models)")
    input_data: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        description=(
            "models of text tasks: a string or a list of strings; of image tasks: a path under the image root, "
            "base64 of the encoded image, or a data URI (data:image/png;base64,...), or a list of these"
        )
    )

    parameters: dict[str, JsonValue] | None = Field(
        None,
        description="the model's task's request parameters, if it takes any: feature-extraction "
        '{"prompt_name": "query"} (a prompt of the model\'s own), token-classification {"aggregation_strategy": '
        '"max"}; a parameter the task does not take is a 422',
    )

    def inference_request(self) -> InferenceRequest:
        inputs = [self.input_data] if isinstance(self.input_data, str) else self.input_data
        return InferenceRequest(inputs=inputs, parameters=self.parameters)


class InvalidPredictBody(RequestValidationError):
    """A ``/predict`` body that does not validate: FastAPI's 422 naming the fields, which the data plane's
    metrics record as the 422 it is (``status_code``), not as a server error."""

    status_code = 422


def parse_predict_request(body: bytes, max_items: int) -> PredictRequest:
    """The body of ``POST /predict``, bounded while it is parsed; a bad body is FastAPI's 422, naming the
    field. Runs through ``bodies.parse_bounded``."""
    check_json_budget(body, 32 + 2 * max_items, f"a request of at most {max_items} inputs and its parameters")
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as e:
        raise not_json(e) or InvalidPredictBody(e.errors(include_url=False)) from None


class PredictResponse(BaseModel):
    model_id: str = Field(description="the model that answered")
    task: str = Field(description="its task")
    predictions: list[Any] = Field(
        description="one prediction per input, in input order, in its task's form: classification "
        '{"label", "score", "scores": [{"label", "score"}, ...]}; feature extraction {"embedding": [...]}; '
        'token classification [{"entity_group", "score", "word", "start", "end"}, ...] (docs/models.md)'
    )


class ReplicaModels(BaseModel):
    replica_id: str
    node_id: str | None = None
    models: list[str] = Field(description="models this replica holds or is loading now")
    slots: int = Field(description="most models it holds at once")
    threads: int = Field(
        description="its forward passes' intra-op threads under load (a lone request on an idle node may use more)"
    )
    idle_threads: dict[str, IdleThreadsReport] = Field(
        default_factory=dict,
        description="for each model it holds, its lone requests on an idle node timed on these threads and on "
        "the node's idle threads as well, and which it now uses",
    )
    packed_batches: dict[str, int] = Field(
        default_factory=dict,
        description="for each model it holds whose batches of texts run packed, without their padding "
        "(docs/models.md), the forward passes run so; a model whose batches run padded is not listed",
    )
    memory: ReplicaMemory = Field(description="its memory: the budget its models may take, what they take")
    counters: ReplicaCounters = Field(description="what this replica has done since it started")
    registry: RegistryStatus | None = Field(None, description="the registry this replica runs (null: not reported yet)")


class RegistryInfo(BaseModel):
    """The registry of the ingress replica that answered, and how far it has reached."""

    replica_id: str | None = Field(None, description="the ingress replica that answered")
    version: str | None = Field(None, description="content hash of the registry in force")
    applied_at: float | None = Field(None, description="Unix time the answering ingress replica applied it")
    models: int = Field(0, description="models in it")
    refused: RefusedRegistry | None = Field(
        None, description="the last change this ingress replica refused since it applied this one (null: none)"
    )
    on_every_replica: bool = Field(
        description="every worker replica reports this version, and Serve has no ingress replica left to update"
    )


class ModelInfo(BaseModel):
    id: str
    task: str
    input_modality: str = Field(description="the kind of input its task takes: text, image, ...")
    runtime: str = Field(description="the runtime class it runs on, package.module:Class")
    description: str
    labels: list[str]
    source: str
    preload: bool
    state: ModelState = Field(description="not_loaded, loading, loaded or failed (its last load failed)")
    loaded: bool = Field(description="held by at least one worker replica now")
    replicas: list[str] = Field(description="ids of the worker replicas that hold it")
    load_count: int = Field(description="loads so far, over the replicas running now")
    unload_count: int = Field(description="unloads so far (LRU evictions and explicit unloads), likewise")
    last_loaded_at: float | None = Field(None, description="Unix time of the last successful load")
    last_load_seconds: float | None = Field(None, description="how long that load took")
    last_used_at: float | None = Field(None, description="Unix time of the last prediction")
    last_error: str | None = Field(None, description="the last load error, if any")
    load_failures: int = Field(0, description="failed loads so far, over the replicas running now")
    request_failures: int = Field(
        0,
        description="requests its own code failed once loaded (503: its runtime raised, or answered outside its "
        "task's contract), over the replicas running now",
    )
    last_request_error: str | None = Field(None, description="the newest of them, as its client read it")
    declared_bytes: int | None = Field(None, description="the size its registry entry declares (memory_bytes)")
    size_bytes: int | None = Field(
        None, description="what a copy takes, as the newest load measured it: the larger of the next two"
    )
    weights_bytes: int | None = Field(None, description="its weights and buffers, exactly, as its runtime reports")
    rss_growth_bytes: int | None = Field(None, description="how much the replica's resident memory grew at that load")


class ModelList(BaseModel):
    registry: RegistryInfo
    models: list[ModelInfo]
    replicas: list[ReplicaModels] = Field(description="every running worker replica and its models")


class ErrorResponse(BaseModel):
    error: str
    message: str


class ReadinessResponse(BaseModel):
    ready: bool
    models: int
    worker_replicas: int


def predict_response(result: InferenceResult) -> PredictResponse:
    return PredictResponse(model_id=result.spec.id, task=result.spec.task, predictions=result.native())


def model_info(status: ModelStatus) -> ModelInfo:
    spec = status.spec
    return ModelInfo(
        id=spec.id,
        task=spec.task,
        input_modality=status.input_kind,
        description=spec.description,
        labels=spec.labels,
        source=spec.source.describe(),
        preload=spec.preload,
        declared_bytes=spec.memory_bytes,
        loaded=status.loaded,
        **status.model_dump(exclude={"spec", "input_kind"}),
    )


def model_list(listing: ModelListing, replica_id: str | None = None) -> ModelList:
    """``replica_id``: the ingress replica that answers."""
    return ModelList(
        registry=RegistryInfo(
            replica_id=replica_id, **listing.registry.model_dump(), on_every_replica=listing.on_every_replica
        ),
        models=[model_info(m) for m in listing.models],
        replicas=[
            ReplicaModels(
                replica_id=r.replica_id,
                node_id=r.node_id,
                models=r.held,
                slots=r.slots,
                threads=r.threads,
                idle_threads={m: r.models[m].idle_threads for m in r.held if r.models[m].idle_threads is not None},
                packed_batches={
                    m: r.models[m].packed_batches for m in r.held if r.models[m].packed_batches is not None
                },
                memory=r.memory,
                counters=r.counters,
                registry=r.registry,
            )
            for r in listing.replicas
        ],
    )


def readiness(ready: Readiness, models: int) -> ReadinessResponse:
    return ReadinessResponse(ready=ready.ready, models=models, worker_replicas=ready.replicas)
