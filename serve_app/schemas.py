"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve_app.registry import Modality, Task

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model_id": "sentiment", "input_data": "This movie was great!"},
                {"model_id": "spam", "input_data": ["Win a free iPhone now!", "See you at lunch"]},
                {"model_id": "image", "input_data": "samples/images/image.jpg"},
            ]
        }
    )

    model_id: NonEmptyStr = Field(description="id of a model in the registry (GET /models)")
    input_data: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]] = Field(
        description=(
            "text models: a string or a list of strings; image models: a path under the image root, "
            "base64 of the encoded image, or a data URI (data:image/png;base64,...), or a list of these"
        )
    )


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str = Field(description="the most likely label")
    score: float = Field(description="its probability")
    scores: list[LabelScore] = Field(description="every label with its probability, most likely first")

    @classmethod
    def from_scores(cls, scores: list[dict]) -> "Prediction":
        """From a runtime's output for one input: label scores, most likely first."""
        return cls(label=scores[0]["label"], score=scores[0]["score"], scores=scores)


class PredictResponse(BaseModel):
    model_id: str = Field(description="the model that answered")
    task: Task
    predictions: list[Prediction] = Field(description="one prediction per input, in input order")


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
    replica_id: str
    node_id: str | None = None
    models: dict[str, ReplicaModelStatus] = Field(default_factory=dict)

    @property
    def held(self) -> list[str]:
        return sorted(m for m, s in self.models.items() if s.state in (ModelState.LOADED, ModelState.LOADING))


class ReplicaModels(BaseModel):
    replica_id: str
    node_id: str | None = None
    models: list[str] = Field(description="models this replica holds or is loading now")


class ModelInfo(BaseModel):
    id: str
    task: Task
    input_modality: Modality
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


class ModelList(BaseModel):
    models: list[ModelInfo]
    replicas: list[ReplicaModels] = Field(description="every running worker replica and its models")


class ErrorResponse(BaseModel):
    error: str
    message: str
