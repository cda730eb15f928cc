"""Typed application arguments: the ``args`` of the application in ``serve_config.yaml``.

Ray Serve validates the ``args`` mapping against ``AppArgs`` before it calls
the builder (``serve_app.app:build_app``), so a typo or a wrong type stops
``serve run`` with a message that names the field.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve_app.core.paths import resolve_project_path

logger = logging.getLogger("ray.serve")

SHIPPED_TASKS = (
    "deployments.tasks.text_classification",
    "deployments.tasks.image_classification",
    "deployments.tasks.feature_extraction",
    "deployments.tasks.token_classification",
    "deployments.tasks.image_feature_extraction",
)
"""The task modules the app serves unless its args name others (``serve_app.core.tasks``)."""

MODEL_ROOTS = ("models",)
"""Where a registry entry's local source may lie unless the app's args name other folders: the project's
``models/``, where ``make models`` builds the demo models."""


class _Strict(BaseModel):
    # An infinite timeout or back-off (YAML's .inf) would turn a guard off: a slow sender never cut, a failed
    # model never tried again.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
        0.001,
        ge=0,
        description="how long a batch waits to fill up once its first request is in; 0: take what is queued",
    )


class RoutingArgs(_Strict):
    """How requests are placed on the worker replicas (deployments/routing): docs/performance.md."""

    policy: Literal["model_aware", "ray_default"] = Field(
        "model_aware",
        description="model_aware: spread hot models, place misses by what they evict; "
        "ray_default: Ray Serve's own multiplexed routing (two random holders), for comparison",
    )
    spread_at: int = Field(
        4, ge=1, description="requests in flight on every holder of a model at which it gets a copy on another replica"
    )
    demand_half_life_s: float = Field(
        60.0, gt=0, description="half-life of a model's recent demand, which decides what a miss evicts"
    )
    affinity_half_life_s: float = Field(
        2.0,
        gt=0,
        description="half-life of the router's count of the requests it sent each replica, by model: a hit goes "
        "first to a holder not serving other models more than this one lately, so that two hot models on the same "
        "replicas settle one on each",
    )
    stats_period_s: float = Field(
        0.5, gt=0, description="how often Serve collects each worker replica's model status for the routers"
    )
    load_grace_s: float = Field(
        5.0,
        gt=0,
        description="how long the router trusts its own record of a miss it placed (the model it sent, the one "
        "the replica's LRU evicts for it) over the model ids the replica pushes, which lag behind",
    )
    holder_grace_s: float = Field(
        3.0,
        ge=0,
        description="how long a request for a model only a replica that left the routing set held waits for it "
        "(Serve takes a replica out while it applies a registry change) before it loads a copy elsewhere",
    )


class WorkerArgs(_Strict):
    """The model-worker deployment (each replica holds at most two models)."""

    num_replicas: int = Field(2, ge=1, description="worker replicas (without autoscaling)")
    autoscaling: AutoscalingArgs | None = Field(None, description="scale between min and max replicas with load")
    max_replicas_per_node: int | None = Field(None, ge=1, description="spread replicas: at most this many per node")
    num_cpus: float = Field(0.5, gt=0, description="Ray logical CPUs reserved per worker replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker replica (models go to CUDA when one is visible)")
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="requests a worker replica takes at once (at least batching.max_batch_size); what the ingress "
        "takes over the replicas, so that no request waits in the router's back-off while a batch queue could hold it",
    )
    torch_threads: int | None = Field(
        1, ge=1, description="torch intra-op threads per replica; null keeps torch's default"
    )
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    routing: RoutingArgs = Field(default_factory=RoutingArgs)
    load_failure_backoff_s: float = Field(
        30.0, ge=0, description="after a failed load, requests for that model get 503 for this long, evicting nothing"
    )
    load_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a model load that has not finished in this long fails (a 503 naming it, then the back-off), "
        "and the replica's other models load meanwhile; its thread goes on and frees the copy when it returns",
    )
    memory_bytes: int | None = Field(
        None,
        gt=0,
        description="the memory of one worker replica: Ray reserves it (ray_actor_options.memory), and the replica "
        "keeps its models within it less its own baseline, evicting by bytes; null: count only (two models a "
        "replica, whatever their size)",
    )
    baseline_bytes: int = Field(
        640 * 1024 * 1024,
        gt=0,
        description="what a worker replica takes before it loads any model (Ray, torch and transformers), as the "
        "registry check counts it against declared model sizes; each replica measures its own at start",
    )
    gpu_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="on a CUDA device: the device memory a replica keeps its models within (null: the device's "
        "memory less what torch reserved at start)",
    )
    max_concurrent_decodes: int = Field(
        1,
        ge=1,
        description="requests whose inputs (images) one replica decodes at once; the others wait their turn, so "
        "that a flood of costly images takes this many threads of a replica, not every core of its node",
    )

    @model_validator(mode="after")
    def _batches_fit(self) -> WorkerArgs:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least batching.max_batch_size, or batches never fill")
        if self.memory_bytes is not None and self.memory_bytes <= self.baseline_bytes:
            raise ValueError("memory_bytes must be more than baseline_bytes, or no model fits")
        return self

    @property
    def model_budget_bytes(self) -> int | None:
        """The bytes a replica's models may take, as the registry check counts them (None: none known before a
        replica starts): with a GPU (``num_gpus``), where the models go, ``gpu_memory_bytes`` (unset: the
        device's memory, which only a replica can measure), as the replica budgets (``MemoryBudget``); else
        ``memory_bytes`` less ``baseline_bytes``."""
        if self.num_gpus > 0:
            return self.gpu_memory_bytes
        return None if self.memory_bytes is None else self.memory_bytes - self.baseline_bytes


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
    timeout_s: float = Field(5.0, gt=0, description="total time for the fetches of one request")


class AuthArgs(_Strict):
    """Who may call the API: a required, explicit choice.

    ``api_key``: every route but the health probes needs ``Authorization: Bearer <key>``, and loading or
    unloading a model needs the admin key. Each key comes from the environment (``MMS_API_KEY``,
    ``MMS_ADMIN_KEY``) or from a file; the keys themselves never go in serve_config.yaml.
    ``off``: anyone who reaches the port may predict, load and unload; start-up logs a warning."""

    mode: Literal["api_key", "off"] = Field(description="api_key, or off in plain words")
    api_key_file: str | None = Field(None, description="a file holding the API key (MMS_API_KEY takes precedence)")
    admin_key_file: str | None = Field(
        None, description="a file holding the admin key for load and unload (MMS_ADMIN_KEY takes precedence)"
    )


class RegistryRules(_Strict):
    """What a registry may name and declare: the tasks, the modules runtime classes may come from
    (``serve_app.core.tasks``), the folders its models' files may lie in, and the bytes a worker replica's
    models may take. Only the operator who deploys
    the app sets these (its args): the registry, which changes live, cannot widen them."""

    tasks: list[str] = Field(default_factory=lambda: list(SHIPPED_TASKS), min_length=1)
    runtime_modules: list[str] = Field(default_factory=list)
    model_roots: list[str] = Field(default_factory=lambda: list(MODEL_ROOTS), min_length=1)
    model_budget_bytes: int | None = Field(None, description="a declared model size above it is refused")

    def catalog(self):  # -> serve_app.core.tasks.TaskCatalog (imported here: it imports this module)
        from serve_app.core.tasks import TaskCatalog

        return TaskCatalog.load(self.tasks, self.runtime_modules, self.model_roots)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``localhost``, or an IPv4 address mapped into IPv6) is this machine's
    loopback, which no other machine reaches. ``0.0.0.0``, ``::``, an empty host and any other name are not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


ALL_INTERFACES = "0.0.0.0"


def default_http_host(environ: Mapping[str, str] = os.environ) -> str:
    """The address Ray Serve's HTTP entries listen on when Serve is started from Python without
    ``http_options`` (``serve.run(build_app(...))``: Ray's ``HTTPOptions`` default): every interface with
    HAProxy (``RAY_SERVE_ENABLE_HA_PROXY=1``, as config/serve.env sets: Ray then binds where HAProxy on other
    nodes reaches the replicas, whatever ``RAY_SERVE_DEFAULT_HTTP_HOST`` says), else
    ``RAY_SERVE_DEFAULT_HTTP_HOST``, else 127.0.0.1. (A config file's ``http_options`` without a host is
    another default: ``CONFIG_FILE_HTTP_HOST``.)"""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # as Ray reads it
        return ALL_INTERFACES
    return environ.get("RAY_SERVE_DEFAULT_HTTP_HOST") or "127.0.0.1"


CONFIG_FILE_HTTP_HOST = ALL_INTERFACES
"""The address Serve listens on for a config file (``serve run`` or ``serve deploy`` of it) whose
``http_options`` name no ``host``: the default of Ray's config schema, every interface."""


def listen_refusal(host: str | None, auth: AuthArgs) -> str | None:
    """Why an app with these auth settings must not listen on ``host`` (Serve's ``http_options.host``), in
    one line; None when it may. With auth off, anyone who reaches the app may predict, load and unload
    models, so it listens on the loopback only. ``host`` None: not known (no Serve instance runs yet)."""
    if auth.mode != "off" or host is None or is_loopback(host):
        return None
    return (
        f"auth.mode is off and http_options.host is {host!r}: anyone who reaches that address could predict, "
        "load and unload models; listen on 127.0.0.1, or set auth.mode: api_key with its keys"
    )


class EnvSettings(BaseSettings):
    """Settings read from the environment of the ingress replicas."""

    model_config = SettingsConfigDict(env_prefix="MMS_")
    api_key: SecretStr | None = None
    admin_key: SecretStr | None = None


class AppArgs(_Strict):
    """The application's arguments (``args`` in serve_config.yaml)."""

    registry_path: str = Field("config/models.json", description="the model registry; relative to the project root")
    image_root: str = Field(
        "samples/images", description="image paths in requests must lie under this folder; relative to the project root"
    )
    max_list_items: int = Field(32, ge=1, description="most inputs in one request's input_data list")
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1, description="largest encoded image accepted")
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="largest image (width x height) accepted: a 24-megapixel photo (6000 x 4000); the image models "
        "resize to a few hundred pixels a side",
    )
    max_request_pixels: int = Field(
        50_000_000, ge=1, description="most pixels of all the images of one request together"
    )
    max_pixels_per_byte: int = Field(
        1024,
        ge=1,
        description="most pixels an image of a format decoded whole (PNG, WebP, GIF, BMP: all but JPEG) may have per "
        "byte of its file: more is a decompression bomb (a photo has a few pixels a byte; RGB PNG cannot pass ~344)",
    )
    max_text_chars: int = Field(20_000, ge=1, description="longest text input, in characters")
    request_timeout_s: float = Field(60.0, gt=0, description="time a prediction may take, load included")
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description="how often Serve's controller checks that each replica still runs: one that died (a crash, the "
        "OOM killer) is dropped from routing and GET /models, and replaced, within about this (Serve's default: 10 s)",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="time a client has to send its whole request body once the ingress has its headers; after it, "
        "408 and the connection closes, so that slow senders cannot hold the ingress's requests",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="largest request body (larger ones get 413 unread); also the most bytes of one request's images "
        "once decoded (paths and URLs included), or max_image_bytes if that is more",
    )
    auth: AuthArgs = Field(description="who may call the API: api_key or off (required)")
    tasks: list[str] = Field(
        default_factory=lambda: list(SHIPPED_TASKS),
        min_length=1,
        description="the task modules the registry's entries may name tasks of (each module defines TASK)",
    )
    runtime_modules: list[str] = Field(
        default_factory=list,
        description='modules a registry entry may take its own runtime class from ("runtime": '
        '"module:Class"), besides the task modules: only the operator sets these',
    )
    model_roots: list[str] = Field(
        default_factory=lambda: list(MODEL_ROOTS),
        min_length=1,
        description="folders a registry entry's local source (source.path) must lie under, symlinks resolved; "
        "relative to the project root. Only the operator sets these: the registry cannot widen them",
    )
    url_fetch: UrlFetchArgs = Field(default_factory=UrlFetchArgs)
    worker: WorkerArgs = Field(default_factory=WorkerArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)

    @property
    def registry_rules(self) -> RegistryRules:
        return RegistryRules(
            tasks=self.tasks,
            runtime_modules=self.runtime_modules,
            model_roots=self.model_roots,
            model_budget_bytes=self.worker.model_budget_bytes,
        )

    @property
    def max_request_bytes(self) -> int:
        """Most bytes of one request's images once decoded (read from paths and URLs included): the body
        limit, or one image of the largest size if that is more."""
        return max(self.max_body_bytes, self.max_image_bytes)

    def largest_worker_message(self) -> int:
        """Bytes of the largest request the ingress can send a worker replica: its decoded inputs (images at
        most max_request_bytes together; texts at most 4 bytes a character in UTF-8), plus room for framing."""
        texts = self.max_list_items * self.max_text_chars * 4
        return max(self.max_request_bytes, texts) + 1024 * 1024

    @model_validator(mode="after")
    def _request_budget_fits_an_image(self) -> AppArgs:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError("max_request_pixels must be at least max_image_pixels")
        return self


class AuthConfigError(ValueError):
    """The auth settings are missing a key, or hold an empty one: the app refuses to start."""


@dataclass(frozen=True)
class Keys:
    """The keys in force; both None when auth is off."""

    api: bytes | None
    admin: bytes | None

    @property
    def on(self) -> bool:
        return self.api is not None


def _key(name: str, env: SecretStr | None, file: str | None) -> bytes:
    if env is not None:
        value = env.get_secret_value().strip()
        if not value:  # an empty variable must not leave the API open
            raise AuthConfigError(f"MMS_{name.upper()} is set but empty")
        return value.encode()
    if file:
        path = resolve_project_path(file)
        value = Path(path).read_text(encoding="utf-8").strip()
        if not value:  # an unfilled secret must not leave the API open
            raise AuthConfigError(f"auth.{name}_file {path} is empty")
        return value.encode()
    raise AuthConfigError(
        f"auth.mode is api_key but no {name.replace('_', ' ')} is set: set MMS_{name.upper()} or auth.{name}_file"
    )


def resolve_keys(auth: AuthArgs) -> Keys:
    """The keys ``auth`` asks for, from the environment or their files. Refuses to start on an empty key,
    a missing one, or an admin key equal to the API key; with auth off, a key set anyway is logged as
    ignored (one cluster's environment can serve an open app beside a keyed one)."""
    env = EnvSettings()
    if auth.mode == "off":
        stray = [f"MMS_{n.upper()}" for n in ("api_key", "admin_key") if getattr(env, n) is not None]
        stray += [f"auth.{n}" for n in ("api_key_file", "admin_key_file") if getattr(auth, n)]
        if stray:
            logger.warning("auth.mode is off: %s is set and ignored", ", ".join(stray))
        return Keys(api=None, admin=None)
    keys = Keys(
        api=_key("api_key", env.api_key, auth.api_key_file), admin=_key("admin_key", env.admin_key, auth.admin_key_file)
    )
    if keys.api == keys.admin:
        raise AuthConfigError("the admin key must differ from the API key")
    return keys
