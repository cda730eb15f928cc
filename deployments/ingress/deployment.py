"""The ingress deployment: FastAPI routes and gRPC methods, each a protocol adapter's parsing and shaping
around one data-plane call. Three APIs on one ingress: the native one (``/predict``, ``/models``), the
Open Inference Protocol v2 over REST (``/v2/...``), with health probes beside them, and the same protocol
over gRPC (``inference.GRPCInferenceService``, through Ray Serve's gRPC proxy: each RPC calls the method
of its name).

The registry arrives as Serve's ``user_config`` and changes in ``reconfigure`` while requests run
(``serve_app.core.live_registry``); ``GET /models`` reports the version each replica runs.

(No ``from __future__ import annotations`` here: FastAPI must see the route annotations as types.)
"""

import asyncio
import functools
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from deployments.ingress.bodies import parse_bounded
from deployments.ingress.dataplane import NATIVE_API, DataPlane, InferenceResult
from deployments.ingress.http_errors import install_error_handlers
from deployments.ingress.middleware import AuthMiddleware, BodyLimitMiddleware
from deployments.ingress.protocols import native, v2, v2_grpc
from deployments.ingress.replicas import ReplicaDirectory
from serve_app.core import logs
from serve_app.core.config import AppArgs, resolve_keys
from serve_app.core.live_registry import LiveRegistry

logger = logging.getLogger("ray.serve")

VERSION = "0.1.0"


class _Api(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's OpenAPI document, with the schemas that the self-parsed request bodies refer to."""
        if self.openapi_schema is None:
            components = super().openapi().setdefault("components", {}).setdefault("schemas", {})
            for name, schema in _BODY_SCHEMAS.items():
                components.setdefault(name, schema)
        return self.openapi_schema


_BODY_SCHEMAS: dict[str, Any] = {}
"""The schemas that the request bodies of ``_body`` refer to, added to the OpenAPI document's components."""

api = _Api(
    title="Multi-model serving on Ray Serve",
    description="Many Hugging Face models from a small pool of Ray Serve replicas, loaded on demand. "
    "Native API (/predict, /models) and the Open Inference Protocol v2 (/v2).",
    version=VERSION,
)
install_error_handlers(api)
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(AuthMiddleware)  # added last, so it runs first

_errors = {code: {"model": native.ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503, 504)}


def _body(model: type) -> dict:
    """The OpenAPI request body of a route that parses its own body (bounded: deployments/ingress/bodies.py)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _BODY_SCHEMAS.update(schema.pop("$defs", {}))
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}


OFF_LOOP_ELEMENTS = 20_000
"""An answer of more array elements than this (the images of a request to a model of thousands of labels, long
embeddings of many inputs) is shaped and serialized on a thread, off the event loop every request shares:
32 images to a model of 21,843 labels took 0.35 s of Python there. Below it, on the loop (a thread's hop
would cost the hot path more than the work)."""


def _native_json(result: InferenceResult) -> Response:
    """``POST /predict``'s answer, serialized (as FastAPI serializes its response model)."""
    return Response(native.predict_response(result).model_dump_json(), media_type="application/json")


def _v2_http(request: v2.InferRequest, result: InferenceResult, whole: bool = False) -> Response | v2.InferResponse:
    """A v2 REST infer answer: its JSON (serialized here if ``whole``, else by FastAPI), or the JSON and the
    outputs' bytes of the binary data extension."""
    response, binary = v2.infer_response(request, result)
    if not binary and not whole:
        return response
    header = response.model_dump_json(exclude_none=True).encode()
    if not binary:
        return Response(header, media_type="application/json")
    return Response(  # the binary data extension: the JSON, then the outputs' bytes
        header + binary,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, worker: DeploymentHandle, registry_check: DeploymentHandle, args: AppArgs) -> None:
        """``registry_check``: bound here only so that Serve deploys it with the app; never called."""
        logs.in_replica()
        # The registry is set by reconfigure, which Serve calls before the replica takes requests.
        self.live = LiveRegistry.from_rules(args.registry_rules)
        self.max_items = args.max_list_items
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        replicas = ReplicaDirectory(worker, ingress=serve.get_replica_context().deployment)
        self.plane = DataPlane(self.live, worker, args, replicas=replicas)
        api.state.keys = keys = resolve_keys(args.auth)  # refuses to start on a missing or empty key
        api.state.max_body_bytes = args.max_body_bytes
        api.state.body_timeout_s = args.body_timeout_s
        self.grpc = v2_grpc.V2Grpc(self.plane, keys, args.max_body_bytes, VERSION, args.max_list_items)
        if not keys.on:
            logger.warning(
                "auth is off (auth.mode: off): anyone who can reach this app may predict, load and unload models"
            )
        logger.info("ingress started, auth %s", args.auth.mode)

    # -- the registry ---------------------------------------------------------------------------------

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Apply the registry in ``user_config`` (Serve calls this at start and on every change of it). A bad
        one is refused and this replica keeps its registry; while starting it has none to keep, and the error
        stops the start. (``rank`` is unused: asking for it makes Serve call this at start even without a
        user_config, so that a replica without a registry does not start.)"""
        await self.live.apply_checked_off_loop(user_config)

    # -- health -------------------------------------------------------------------------------------

    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Live: the ingress answers."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], response_model=native.ReadinessResponse)
    async def readyz(self) -> JSONResponse:
        """Ready: the registry is loaded and at least one worker replica is running."""
        body = native.readiness(await self.plane.ready(), self.live.status().models)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    # -- native API ---------------------------------------------------------------------------------

    @api.get("/models", response_model=native.ModelList, tags=["models"])
    async def list_models(self) -> native.ModelList:
        return native.model_list(await self.plane.models(), self.replica_id)

    @api.get("/models/{model_id}", response_model=native.ModelInfo, responses=_errors, tags=["models"])
    async def get_model(self, model_id: str) -> native.ModelInfo:
        return native.model_info(await self.plane.model(model_id))

    @api.post("/models/{model_id}/load", response_model=native.ModelInfo, responses=_errors, tags=["models"])
    async def load_model(self, model_id: str) -> native.ModelInfo:
        """Load a model on one worker replica now (the two-per-replica cap still holds)."""
        return native.model_info(await self.plane.load(model_id))

    @api.post("/models/{model_id}/unload", response_model=native.ModelInfo, responses=_errors, tags=["models"])
    async def unload_model(self, model_id: str) -> native.ModelInfo:
        """Unload a model from every worker replica that holds it."""
        return native.model_info(await self.plane.unload(model_id))

    @api.post(
        "/predict",
        response_model=native.PredictResponse,
        responses=_errors,
        tags=["predict"],
        openapi_extra=_body(native.PredictRequest),
    )
    async def predict(self, request: Request) -> native.PredictResponse:
        parse = functools.partial(native.parse_predict_request, max_items=self.max_items)
        body = await self.plane.parsed(NATIVE_API, parse_bounded(parse, await request.body()))
        result = await self.plane.infer(body.model_id, body.inference_request(), api=NATIVE_API)
        if result.elements > OFF_LOOP_ELEMENTS:
            return await asyncio.to_thread(_native_json, result)
        return native.predict_response(result)

    # -- Open Inference Protocol v2 -----------------------------------------------------------------

    @api.get("/v2", response_model=v2.ServerMetadata, tags=["v2"])
    async def v2_server(self) -> v2.ServerMetadata:
        return v2.server_metadata(VERSION)

    @api.get("/v2/health/live", tags=["v2"])
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def v2_ready(self) -> JSONResponse:
        ready = (await self.plane.ready()).ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    @api.get("/v2/models/{name}", response_model=v2.ModelMetadata, tags=["v2"])
    @api.get("/v2/models/{name}/versions/{version}", response_model=v2.ModelMetadata, include_in_schema=False)
    async def v2_model(self, name: str, version: str | None = None) -> v2.ModelMetadata:
        spec = self.plane.spec(name)
        v2.check_version(name, version)
        return v2.model_metadata(spec, self.plane.task(spec))

    @api.get("/v2/models/{name}/ready", tags=["v2"])
    @api.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def v2_model_ready(self, name: str, version: str | None = None) -> JSONResponse:
        self.plane.spec(name)
        v2.check_version(name, version)
        loaded = (await self.plane.model(name)).loaded
        return JSONResponse({"name": name, "ready": loaded}, status_code=200 if loaded else 400)

    @api.post(
        "/v2/models/{name}/infer",
        response_model=v2.InferResponse,
        response_model_exclude_none=True,  # no "id": null when the request had none
        tags=["v2"],
        openapi_extra=_body(v2.InferRequest),
    )
    @api.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=v2.InferResponse,
        response_model_exclude_none=True,
        include_in_schema=False,
    )
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> v2.InferResponse:
        header_length = request.headers.get("inference-header-content-length")
        parser = v2.BodyParser(await request.body(), header_length, self.max_items, (name, version))
        result = await self.plane.infer(name, parser, api="v2")
        if result.elements > OFF_LOOP_ELEMENTS:
            return await asyncio.to_thread(_v2_http, parser.request, result, whole=True)
        return _v2_http(parser.request, result)

    @api.post(
        "/v2/repository/index",
        response_model=list[v2.RepositoryModel],
        tags=["v2 repository"],
        openapi_extra={"requestBody": {**_body(v2.RepositoryIndexRequest)["requestBody"], "required": False}},
    )
    async def v2_repository_index(self, request: Request) -> list[v2.RepositoryModel]:
        body = await parse_bounded(v2.parse_repository_index_request, await request.body())
        return v2.repository_index(await self.plane.models(), ready_only=body.ready)

    @api.post("/v2/repository/models/{name}/load", tags=["v2 repository"])
    async def v2_repository_load(self, name: str) -> Response:
        await self.plane.load(name)
        return Response(status_code=200)

    @api.post("/v2/repository/models/{name}/unload", tags=["v2 repository"])
    async def v2_repository_unload(self, name: str) -> Response:
        await self.plane.unload(name)
        return Response(status_code=200)

    # -- Open Inference Protocol over gRPC (inference.GRPCInferenceService) --------------------------------
    # Every RPC gets its request message as bytes, which the adapter decodes (protocols/grpc_wire.py: within
    # bounds for ModelInfer and the repository's load and unload). tritonclient's generated classes name a
    # module that pickle cannot import ("grpc_service_pb2"): neither this class (cloudpickled with the FastAPI
    # app) nor Serve's gRPC proxy, which pickles a request on its way to a replica without direct ingress,
    # could carry one.

    async def ServerLive(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ServerLive(request, grpc_context)

    async def ServerReady(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ServerReady(request, grpc_context)

    async def ServerMetadata(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ServerMetadata(request, grpc_context)

    async def ModelReady(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ModelReady(request, grpc_context)

    async def ModelMetadata(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ModelMetadata(request, grpc_context)

    async def ModelInfer(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.ModelInfer(request, grpc_context)

    async def RepositoryIndex(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.RepositoryIndex(request, grpc_context)

    async def RepositoryModelLoad(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.RepositoryModelLoad(request, grpc_context)

    async def RepositoryModelUnload(self, request: bytes, grpc_context: RayServegRPCContext):
        return await self.grpc.RepositoryModelUnload(request, grpc_context)

    # The service's other RPCs answer UNIMPLEMENTED.
    ModelConfig = ModelStatistics = TraceSetting = LogSettings = v2_grpc.unimplemented
    SystemSharedMemoryStatus = SystemSharedMemoryRegister = SystemSharedMemoryUnregister = v2_grpc.unimplemented
    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = v2_grpc.unimplemented
    ModelStreamInfer = v2_grpc.unimplemented_stream
