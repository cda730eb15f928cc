"""Typed application arguments: the ``args`` of the application in ``serve_config.yaml``.

Ray Serve validates the ``args`` mapping against ``AppArgs`` before it calls
the builder (``serve_app.app:build_app``), so a typo or a wrong type stops
``serve run`` with a message that names the field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.core.paths import resolve_project_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingArgs(_Strict):
    """Ray Serve autoscaling of the worker deployment (replaces ``num_replicas`` when set)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2, gt=0, description="ongoing requests per replica that autoscaling aims at")
    upscale_delay_s: float = Field(5.0, ge=0, description="how long load must stay high before adding a replica")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long load must stay low before removing one")
    look_back_period_s: float = Field(30.0, gt=0, description="window over which ongoing requests are averaged")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report their load")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self


class BatchingArgs(_Strict):
    """Dynamic batching per model (``@serve.batch``): concurrent requests for one model run as one call.
    A batch never mixes models: Ray Serve splits batches by multiplexed model id."""

    max_batch_size: int = Field(8, ge=1, description="most requests in one batch (1 turns batching off)")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="how long a batch waits to fill up; 0: take what is queued (batches still form under load)",
    )


class WorkerArgs(_Strict):
    """The model-worker deployment (each replica holds at most two models)."""

    num_replicas: int = Field(2, ge=1, description="worker replicas (without autoscaling)")
    autoscaling: AutoscalingArgs | None = Field(None, description="scale between min and max replicas with load")
    max_replicas_per_node: int | None = Field(None, ge=1, description="spread replicas: at most this many per node")
    num_cpus: float = Field(0.5, gt=0, description="Ray logical CPUs reserved per worker replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker replica (models go to CUDA when one is visible)")
    max_ongoing_requests: int = Field(
        16, ge=1, description="requests a worker replica takes at once (at least batching.max_batch_size)"
    )
    torch_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads per replica; null keeps torch's default"
    )
    batching: BatchingArgs = Field(default_factory=BatchingArgs)

    @model_validator(mode="after")
    def _batches_fit(self) -> WorkerArgs:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least batching.max_batch_size, or batches never fill")
        return self


class IngressArgs(_Strict):
    """The HTTP ingress deployment."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0, description="Ray logical CPUs reserved per ingress replica")
    max_ongoing_requests: int = Field(64, ge=1)


class UrlFetchArgs(_Strict):
    """Image inputs given as URLs. Off unless enabled, and then only to the listed hosts."""

    enabled: bool = False
    allowed_schemes: list[str] = Field(default_factory=lambda: ["https"])
    allowed_hosts: list[str] = Field(default_factory=list, description="exact host names (or IPs) that may be fetched")
    timeout_s: float = Field(5.0, gt=0, description="total time for one fetch")


class EnvSettings(BaseSettings):
    """Settings read from the environment of the ingress replicas."""

    model_config = SettingsConfigDict(env_prefix="MMS_")
    api_key: SecretStr | None = None


class AppArgs(_Strict):
    registry_path: str = Field("config/models.json", description="the model registry; relative to the project root")
    image_root: str = Field(
        "samples/images", description="image paths in requests must lie under this folder; relative to the project root"
    )
    max_list_items: int = Field(32, ge=1, description="most inputs in one request's input_data list")
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1, description="largest encoded image accepted")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest image (width x height) accepted")
    request_timeout_s: float = Field(60.0, gt=0, description="time a prediction may take, load included")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest request body; larger ones get 413 unread")
    api_key_file: str | None = Field(
        None, description="a file holding the API key (or set MMS_API_KEY); the key itself never goes in this file"
    )
    url_fetch: UrlFetchArgs = Field(default_factory=UrlFetchArgs)
    worker: WorkerArgs = Field(default_factory=WorkerArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)


def resolve_api_key(args: AppArgs) -> str | None:
    """The API key from MMS_API_KEY, else from ``api_key_file``; None when neither is set."""
    env = EnvSettings().api_key
    if env is not None and env.get_secret_value():
        return env.get_secret_value()
    if args.api_key_file:
        path = resolve_project_path(args.api_key_file)
        key = Path(path).read_text(encoding="utf-8").strip()
        if not key:  # an unfilled secret must not leave the API open
            raise ValueError(f"api_key_file {path} is empty")
        return key
    return None
