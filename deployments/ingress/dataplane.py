"""The data plane: what every protocol adapter calls, apart from any protocol.

``infer(model_id, request, api)`` looks the model up, decodes its inputs for its task's input kind,
dispatches them to a worker replica (within the request's deadline, and again on another replica if the
one it ran on died), records the request's metrics and returns a typed result: the task's output arrays,
which the protocol adapters (``protocols/``) shape with the task's output kind. The status calls merge
what the worker replicas report into one state per model.

The registry is this replica's ``LiveRegistry``, which ``reconfigure`` changes while requests run: each
request looks its model up once, in the registry in force when it arrives, and tells the worker which
registry that was, so that a worker that has not applied it yet waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from pydantic import BaseModel, Field
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.ingress.replicas import ReplicaDirectory, ReplicaGone
from serve_app.core.config import AppArgs
from serve_app.core.errors import InvalidInput, ModelUnavailable, RequestTimeout, ServeAppError, echo, unwrap
from serve_app.core.inputs import InputDecoder
from serve_app.core.live_registry import LiveRegistry
from serve_app.core.metrics import UNKNOWN_MODEL, IngressMetrics
from serve_app.core.outputs import native_answer, output_code, v2_tensors
from serve_app.core.registry import ModelSpec, Registry
from serve_app.core.schemas import DECLARED_BYTES, ModelState, RegistryStatus, ReplicaStatus, WorkerCall, WorkerResult
from serve_app.core.tasks import Task, TaskCatalog

logger = logging.getLogger("ray.serve")

_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
# How a replica that died under a call surfaces when Serve talks gRPC between replicas (throughput-optimized
# mode): Ray turns UNAVAILABLE into ActorUnavailableError, and passes the other transport codes through.
_GRPC_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})
ATTEMPTS = 3
"""A request runs at most this many times: again on another replica each time the one it ran on died."""


def replica_gone(exc: BaseException) -> bool:
    """Whether a dispatch failed because the worker replica died or went away (not because of the request)."""
    if isinstance(exc, _REPLICA_GONE):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _GRPC_GONE


CLIENT_CLOSED = 499
"""The status recorded for a request whose client went away before the answer (nginx's convention)."""


T = TypeVar("T")


@dataclass(frozen=True)
class InferenceRequest:
    """One prediction request, whatever its protocol."""

    inputs: Sequence[str | bytes]
    timeout_s: float | None = None  # the client's own deadline, when shorter than request_timeout_s
    parameters: Mapping[str, Any] | None = None  # what the client gave for the task (Task.request_parameters)
    other_parameters: bool = False  # the protocol has parameters of its own beside the task's (v2)
    outputs: Collection[str] = ()  # the output tensors it names (v2; none: every one), checked before the model runs


def check_outputs(task: Task, wanted: Collection[str]) -> None:
    """``InvalidInput`` (422) if a request names an output tensor its model's task has not, or one twice (which
    of its two forms, binary or JSON, would it get?)."""
    names = [o.name for o in task.output.outputs()]
    unknown = set(wanted) - set(names)
    if unknown:
        named = ", ".join(echo(n, quote=False) for n in sorted(unknown)[:4]) + (", ..." if len(unknown) > 4 else "")
        raise InvalidInput(f"unknown output(s): {named}; this model has {', '.join(names)}", field="outputs")
    twice = sorted(name for name, n in Counter(wanted).items() if n > 1)
    if twice:
        raise InvalidInput(
            f"output {echo(twice[0], quote=False)} is named twice: name each output once", field="outputs"
        )


NATIVE_API = "native"
"""The API tag of ``POST /predict`` (metrics' ``api``); the others answer with v2 output tensors."""

RequestSource = InferenceRequest | Callable[[], Awaitable[InferenceRequest]]
"""A request, or a coroutine function that parses it out of its body, called once the model is known, so
that an unknown model is a 404 whatever the body holds (the adapter bounds the parse, or runs it in a
thread)."""


@dataclass(frozen=True)
class InferenceResult:
    """One request's answer: its task's output arrays for its ``count`` inputs."""

    spec: ModelSpec
    task: Task
    outputs: dict[str, np.ndarray]
    count: int
    _shaped: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def elements(self) -> int:
        """The elements of its arrays: what shaping and serializing it costs grows with them."""
        return sum(int(array.size) for array in self.outputs.values())

    def native(self) -> list[Any]:
        """One native prediction per input, in input order (``outputs.native_answer``: checked)."""
        shape = functools.partial(native_answer, self.task.output, self.outputs, self.count)
        return self._shape("native", "shape its answer for the native API", shape)

    def v2(self) -> dict[str, np.ndarray]:
        """The Open Inference Protocol's output tensors, by name, in the order of the task's metadata
        (``outputs.v2_tensors``: checked against it)."""
        shape = functools.partial(v2_tensors, self.task.output, self.outputs)
        return self._shape("v2", "shape its answer as v2 output tensors", shape)

    def _shape(self, form: str, step: str, shape: Callable[[], Any]) -> Any:
        """The answer in one ``form``, shaped once by the task's own code (``output_code``: ``step`` names it)."""
        if form not in self._shaped:
            with output_code(self.spec.id, self.task.name, step):
                self._shaped[form] = shape()
        return self._shaped[form]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    replicas: int


class ModelStatus(BaseModel):
    """One model's state over all worker replicas."""

    spec: ModelSpec
    runtime: str = Field(description="the runtime class it runs on, package.module:Class")
    input_kind: str = Field(description="the kind of input its task takes (text, image, ...)")
    state: ModelState
    replicas: list[str] = Field(description="the worker replicas that hold it")
    load_count: int
    unload_count: int
    last_loaded_at: float | None = None
    last_load_seconds: float | None = None
    last_used_at: float | None = None
    last_error: str | None = None
    load_failures: int = 0
    request_failures: int = 0
    last_request_error: str | None = None
    size_bytes: int | None = Field(None, description="what a copy takes, as the newest load measured it")
    weights_bytes: int | None = Field(None, description="its weights and buffers, exactly (newest load)")
    rss_growth_bytes: int | None = Field(None, description="the replica's resident memory growth at that load")

    @property
    def loaded(self) -> bool:
        return bool(self.replicas)


@dataclass(frozen=True)
class ModelListing:
    models: list[ModelStatus]
    replicas: list[ReplicaStatus]
    registry: RegistryStatus  # the registry of the ingress replica that lists
    ingress_updating: bool = False  # Serve is still updating ingress replicas

    @property
    def on_every_replica(self) -> bool:
        """Whether every replica runs the registry this listing comes from: each worker replica reports it (at
        least one is listed: none has confirmed anything while they all start), and no ingress replica is still
        being updated."""
        versions = {r.registry.version if r.registry else None for r in self.replicas}
        return bool(self.replicas) and not self.ingress_updating and versions <= {self.registry.version}


def merge_model_status(
    spec: ModelSpec, replicas: Sequence[ReplicaStatus], catalog: TaskCatalog | None = None
) -> ModelStatus:
    """One model's state from what each replica reports: loaded if any replica holds it, else loading if
    any is loading it, else failed if its newest event is a failed load, else not loaded. ``catalog``: the
    app's tasks (default: the shipped ones)."""
    catalog = catalog or TaskCatalog.load()
    views = [r.models[spec.id] for r in replicas if spec.id in r.models]
    holders = [r.replica_id for r in replicas if spec.id in r.models and r.models[spec.id].state is ModelState.LOADED]
    newest_load = max((v for v in views if v.last_loaded_at), key=lambda v: v.last_loaded_at, default=None)
    measured = newest_load or next((v for v in views if v.size_bytes), None)  # a refused one: its size still
    newest_error = max((v for v in views if v.last_error_at), key=lambda v: v.last_error_at, default=None)
    newest_failure = max(
        (v for v in views if v.last_request_error_at), key=lambda v: v.last_request_error_at, default=None
    )
    last_loaded = newest_load.last_loaded_at if newest_load else None
    if holders:
        state = ModelState.LOADED
    elif any(v.state is ModelState.LOADING for v in views):
        state = ModelState.LOADING
    elif newest_error and (last_loaded is None or newest_error.last_error_at > last_loaded):
        state = ModelState.FAILED
    else:
        state = ModelState.NOT_LOADED
    return ModelStatus(
        spec=spec,
        runtime=catalog.runtime_of(spec),
        input_kind=catalog.task_of(spec).input.name,
        state=state,
        replicas=holders,
        load_count=sum(v.load_count for v in views),
        unload_count=sum(v.unload_count for v in views),
        last_loaded_at=last_loaded,
        last_load_seconds=newest_load.last_load_seconds if newest_load else None,
        last_used_at=max((v.last_used_at for v in views if v.last_used_at is not None), default=None),
        last_error=newest_error.last_error if newest_error else None,
        load_failures=sum(v.load_failures for v in views),
        request_failures=sum(v.request_failures for v in views),
        last_request_error=newest_failure.last_request_error if newest_failure else None,
        size_bytes=measured.size_bytes if measured else None,
        weights_bytes=measured.weights_bytes if measured else None,
        rss_growth_bytes=measured.rss_growth_bytes if measured else None,
    )


def status_of(exc: BaseException) -> int:
    """The status a failed request is recorded with."""
    if isinstance(exc, asyncio.CancelledError):
        return CLIENT_CLOSED
    inner = unwrap(exc)
    return inner.status_code if isinstance(inner, ServeAppError) else getattr(inner, "status_code", 500)


class DataPlane:
    def __init__(
        self,
        live: LiveRegistry,
        worker: DeploymentHandle,
        args: AppArgs,
        metrics: IngressMetrics | None = None,
        replicas: ReplicaDirectory | None = None,
    ) -> None:
        self.live = live
        self.worker = worker
        self.timeout_s = args.request_timeout_s
        self.decoder = InputDecoder(
            image_root=args.image_root,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            max_items=args.max_list_items,
            url_fetch=args.url_fetch,
            max_text_chars=args.max_text_chars,
            max_request_pixels=args.max_request_pixels,
            max_request_bytes=args.max_request_bytes,
            max_pixels_per_byte=args.max_pixels_per_byte,
        )
        self.replicas = replicas or ReplicaDirectory(worker)
        self.metrics = metrics or IngressMetrics()

    @property
    def registry(self) -> Registry:
        """The registry in force now (a request reads it once, when it arrives)."""
        return self.live.registry

    # -- inference ----------------------------------------------------------------------------------

    async def infer(self, model_id: str, request: RequestSource, api: str) -> InferenceResult:
        """One request through the named model; its metrics are recorded here, for every API."""
        registry, version, applied_at = self.registry, self.live.version, self.live.applied_at
        known = model_id in registry
        tag = model_id if known else UNKNOWN_MODEL  # never a tag value from the request
        task_tag = registry.get(model_id).task if known else UNKNOWN_MODEL
        start, status = time.perf_counter(), 200
        try:
            spec = registry.get(model_id)
            task = self.live.catalog.task_of(spec)
            if callable(request):
                request = await request()
            parameters = task.request_parameters(request.parameters, others=request.other_parameters)
            check_outputs(task, request.outputs)
            with output_code(model_id, task.name, "decode its inputs"):  # a task module's input kind is its own code
                decoded = await self.decoder.decode(task.input, request.inputs)
            timeout_s = min(self.timeout_s, request.timeout_s or self.timeout_s)
            call = self._call(
                WorkerCall.PREDICT,
                model_id,
                decoded,
                task=spec.task,
                registry_version=version,
                registry_applied_at=applied_at,
                **{DECLARED_BYTES: spec.memory_bytes},
                **({"parameters": parameters} if parameters else {}),
            )
            result: WorkerResult = await self._with_timeout(model_id, call, timeout_s)
            if result.loaded:
                self.replicas.changed()
            answer = InferenceResult(spec=spec, task=task, outputs=result.outputs, count=len(decoded))
            # Shaped for its API here, where a failure of the task's own code is counted as this request's status.
            if api == NATIVE_API:
                answer.native()
            else:
                answer.v2()
            return answer
        except BaseException as e:
            status = status_of(e)
            if isinstance(e, ModelUnavailable):  # a load that failed, most likely: the listing shows it now
                self.replicas.changed()
            if known and isinstance(e, ServeAppError):  # its answer names the model, whichever step refused
                e.details.setdefault("model_id", model_id)
            raise
        finally:
            self.metrics.observe(tag, task_tag, api, status, time.perf_counter() - start)

    async def _call_once(self, method: WorkerCall, model_id: str, *args: Any, **kwargs: Any) -> Any:
        response = getattr(self.worker.options(multiplexed_model_id=model_id), method.value).remote(*args, **kwargs)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the timeout fired or the client left: cancel the work on the replica too
            raise

    async def _call(self, method: WorkerCall, model_id: str, *args: Any, **kwargs: Any) -> Any:
        """Call a worker method for a model; run it again on another replica if the one it ran on died."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._call_once(method, model_id, *args, **kwargs)
            except Exception as e:
                inner = unwrap(e)
                if isinstance(inner, ServeAppError):
                    raise inner from None
                if not replica_gone(e):
                    raise
                if attempt == ATTEMPTS:
                    raise ModelUnavailable(
                        f"The worker replicas serving {model_id!r} died under the request {ATTEMPTS} times; retry it",
                        model_id=model_id,
                    ) from None
                logger.warning(
                    "worker replica died during a %s of %r (%s); trying again", method.value, model_id, type(e).__name__
                )

    async def _with_timeout(self, model_id: str, coro: Any, timeout_s: float | None = None) -> Any:
        timeout_s = timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(timeout_s):  # in this task (Python 3.11's wait_for runs a task of its own)
                return await coro
        except TimeoutError:
            raise RequestTimeout(
                f"Model {model_id!r} did not answer within {timeout_s:g}s", model_id=model_id
            ) from None

    # -- explicit load and unload -------------------------------------------------------------------

    async def load(self, model_id: str) -> ModelStatus:
        spec = self.registry.get(model_id)
        call = self._call(
            WorkerCall.LOAD,
            model_id,
            registry_version=self.live.version,
            registry_applied_at=self.live.applied_at,
            **{DECLARED_BYTES: spec.memory_bytes},
        )
        try:
            await self._with_timeout(model_id, call)
        except BaseException:  # a failed load too: the next listing asks the replicas (it shows the failure)
            self.replicas.changed()
            raise
        return await self.model(model_id, fresh=True)

    async def unload(self, model_id: str) -> ModelStatus:
        """Unload a model from every replica that holds it: one call to each holder, sent to it by name, within
        request_timeout_s (a replica takes the model out of its cache at once, without waiting for a load under
        way: a replica still loading it holds no copy yet, and keeps the one that load brings). ``ModelUnavailable``
        (503) names the holders that did not confirm it (each unload may still happen there)."""
        self.registry.get(model_id)
        holders = [r.replica_id for r in await self.replicas.statuses(fresh=True) if model_id in r.held]
        answers = await asyncio.gather(
            *(self.replicas.unload(model_id, rid, self.timeout_s) for rid in holders), return_exceptions=True
        )
        self.replicas.changed()
        unconfirmed = []
        for rid, answer in zip(holders, answers, strict=True):
            if isinstance(answer, ReplicaGone):  # the replica stopped before it answered: its copy is gone with it
                continue
            if isinstance(answer, BaseException):
                logger.warning("unloading %r on replica %s: no answer (%r)", model_id, rid, answer)
                why = (
                    f"no answer within {self.timeout_s:g}s"
                    if isinstance(answer, TimeoutError)
                    else type(answer).__name__
                )
                unconfirmed.append(f"{rid}: {why}")
        if unconfirmed:
            raise ModelUnavailable(
                f"Model {model_id!r}: {len(unconfirmed)} of the {len(holders)} worker replicas that held it did not "
                f"confirm its unload ({', '.join(unconfirmed)}); it may still happen there (GET /models/{model_id} "
                "shows where the model is loaded)",
                model_id=model_id,
            )
        return await self.model(model_id, fresh=True)

    async def parsed(self, api: str, parse: Awaitable[T]) -> T:
        """A request's body parsed before its model is known (the native API's; gRPC's envelope); one that
        cannot be is recorded in the metrics under the unknown model, as ``infer`` records the others."""
        start = time.perf_counter()
        try:
            return await parse
        except BaseException as e:
            self.metrics.observe(UNKNOWN_MODEL, UNKNOWN_MODEL, api, status_of(e), time.perf_counter() - start)
            raise

    # -- status -------------------------------------------------------------------------------------

    async def ready(self) -> Readiness:
        replicas = await self.replicas.running_count()
        return Readiness(ready=replicas > 0 and self.live.ready, replicas=replicas)

    async def models(self) -> ModelListing:
        registry, status = self.registry, self.live.status()
        replicas, updating = await asyncio.gather(self.replicas.statuses(), self.replicas.ingress_updating())
        return ModelListing(
            models=[merge_model_status(spec, replicas, self.live.catalog) for spec in registry.models],
            replicas=replicas,
            registry=status,
            ingress_updating=updating,
        )

    def spec(self, model_id: str) -> ModelSpec:
        """A model's registry entry (ModelNotFound if unknown): what its metadata says, in any protocol."""
        return self.registry.get(model_id)

    def task(self, spec: ModelSpec) -> Task:
        """The task a registry entry names, from this app's task catalog."""
        return self.live.catalog.task_of(spec)

    async def model(self, model_id: str, fresh: bool = False) -> ModelStatus:
        spec = self.registry.get(model_id)
        return merge_model_status(spec, await self.replicas.statuses(fresh), self.live.catalog)
