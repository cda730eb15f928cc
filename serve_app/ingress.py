"""The HTTP ingress deployment: thin FastAPI routes over ``ModelHandler``.

Two APIs on one ingress: the native one (``/predict``, ``/models``) and the
Open Inference Protocol v2 (``/v2/...``), with health probes beside them.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import v2
from serve_app.config import AppArgs, resolve_api_key
from serve_app.errors import ServeAppError, install_error_handlers
from serve_app.handlers import ModelHandler
from serve_app.metrics import IngressMetrics
from serve_app.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from serve_app.registry import Registry
from serve_app.schemas import ErrorResponse, ModelInfo, ModelList, ModelState, PredictRequest, PredictResponse

logger = logging.getLogger("ray.serve")

VERSION = "0.1.0"

api = FastAPI(
    title="Multi-model serving on Ray Serve",
    description="Many Hugging Face models from a small pool of Ray Serve replicas, loaded on demand. "
    "Native API (/predict, /models) and the Open Inference Protocol v2 (/v2).",
    version=VERSION,
)
install_error_handlers(api)
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(ApiKeyMiddleware)  # added last, so it runs first

_errors = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503, 504)}
_V2_STATE = {ModelState.LOADED: "READY", ModelState.LOADING: "LOADING", ModelState.FAILED: "FAILED",
             ModelState.NOT_LOADED: "UNAVAILABLE"}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, worker: DeploymentHandle, registry: Registry, args: AppArgs) -> None:
        self.registry = registry
        self.handler = ModelHandler(registry, worker, args)
        self.metrics = IngressMetrics()
        key = resolve_api_key(args)
        api.state.api_key = key.encode() if key else None
        api.state.max_body_bytes = args.max_body_bytes
        logger.info("ingress ready: %d models, API key %s", len(registry.models), "on" if key else "off")

    async def _measured(self, model_id: str, api_name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        if model_id not in self.registry.ids:
            model_id = "(unknown)"  # never a tag value taken from the request
        start, status = time.perf_counter(), 500
        try:
            result = await call()
            status = 200
            return result
        except (ServeAppError, HTTPException) as e:
            status = e.status_code
            raise
        finally:
            self.metrics.observe(model_id, api_name, status, time.perf_counter() - start)

    # -- health -----------------------------------------------------------------------------------

    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Live: the ingress answers."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"])
    async def readyz(self) -> JSONResponse:
        """Ready: the registry is loaded and at least one worker replica is running."""
        ready, replicas = await self.handler.ready()
        body = {"ready": ready, "models": len(self.registry.models), "worker_replicas": replicas}
        return JSONResponse(body, status_code=200 if ready else 503)

    # -- native API -------------------------------------------------------------------------------

    @api.get("/models", response_model=ModelList, tags=["models"])
    async def list_models(self) -> ModelList:
        return await self.handler.models()

    @api.get("/models/{model_id}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}}, tags=["models"])
    async def get_model(self, model_id: str) -> ModelInfo:
        return await self.handler.model(model_id)

    @api.post("/models/{model_id}/load", response_model=ModelInfo, responses=_errors, tags=["models"])
    async def load_model(self, model_id: str) -> ModelInfo:
        """Load a model on one worker replica now (the two-per-replica cap still holds)."""
        return await self.handler.load(model_id)

    @api.post("/models/{model_id}/unload", response_model=ModelInfo, responses=_errors, tags=["models"])
    async def unload_model(self, model_id: str) -> ModelInfo:
        """Unload a model from every worker replica that holds it."""
        return await self.handler.unload(model_id)

    @api.post("/predict", response_model=PredictResponse, responses=_errors, tags=["predict"])
    async def predict(self, request: PredictRequest) -> PredictResponse:
        return await self._measured(request.model_id, "native",
                                    lambda: self.handler.predict(request.model_id, request.input_data))

    # -- Open Inference Protocol v2 ---------------------------------------------------------------

    @api.get("/v2", response_model=v2.ServerMetadata, tags=["v2"])
    async def v2_server(self) -> v2.ServerMetadata:
        return v2.ServerMetadata(name="multimodel-serve", version=VERSION, extensions=["model_repository"])

    @api.get("/v2/health/live", tags=["v2"])
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def v2_ready(self) -> JSONResponse:
        ready, _ = await self.handler.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    @api.get("/v2/models/{name}", response_model=v2.ModelMetadata, tags=["v2"])
    @api.get("/v2/models/{name}/versions/{version}", response_model=v2.ModelMetadata, include_in_schema=False)
    async def v2_model(self, name: str, version: str | None = None) -> v2.ModelMetadata:
        return v2.model_metadata(self.registry.get(name))

    @api.get("/v2/models/{name}/ready", tags=["v2"])
    @api.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def v2_model_ready(self, name: str, version: str | None = None) -> JSONResponse:
        info = await self.handler.model(name)
        return JSONResponse({"name": name, "ready": info.loaded}, status_code=200 if info.loaded else 400)

    @api.post("/v2/models/{name}/infer", response_model=v2.InferResponse, tags=["v2"],
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": v2.InferRequest.model_json_schema()}}, "required": True}})
    @api.post("/v2/models/{name}/versions/{version}/infer", response_model=v2.InferResponse, include_in_schema=False)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> v2.InferResponse:
        async def run() -> v2.InferResponse:
            spec = self.registry.get(name)
            infer, elements = v2.parse_infer_request(
                await request.body(), request.headers.get("inference-header-content-length"))
            result = await self.handler.predict_raw(spec, elements)
            return v2.infer_response(infer, result["model_id"], result["predictions"])

        return await self._measured(name, "v2", run)

    @api.post("/v2/repository/index", response_model=list[v2.RepositoryModel], tags=["v2 repository"])
    async def v2_repository_index(self) -> list[v2.RepositoryModel]:
        listing = await self.handler.models()
        return [v2.RepositoryModel(name=m.id, state=_V2_STATE[m.state], reason=m.last_error or "")
                for m in listing.models]

    @api.post("/v2/repository/models/{name}/load", tags=["v2 repository"])
    async def v2_repository_load(self, name: str) -> Response:
        await self.handler.load(name)
        return Response(status_code=200)

    @api.post("/v2/repository/models/{name}/unload", tags=["v2 repository"])
    async def v2_repository_unload(self, name: str) -> Response:
        await self.handler.unload(name)
        return Response(status_code=200)
