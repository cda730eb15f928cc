"""The HTTP ingress deployment: thin FastAPI routes over ``ModelHandler``."""


from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs
from serve_app.errors import install_error_handlers
from serve_app.handlers import ModelHandler
from serve_app.registry import Registry
from serve_app.schemas import ErrorResponse, ModelInfo, ModelList, PredictRequest, PredictResponse

api = FastAPI(
    title="Multi-model serving on Ray Serve",
    description="Many Hugging Face models from a small pool of Ray Serve replicas, loaded on demand.",
    version="0.1.0",
)
install_error_handlers(api)

_errors = {code: {"model": ErrorResponse} for code in (400, 403, 404, 422, 503, 504)}


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, worker: DeploymentHandle, registry: Registry, args: AppArgs) -> None:
        self.handler = ModelHandler(registry, worker, args)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        return await self.handler.models()

    @api.get("/models/{model_id}", response_model=ModelInfo, responses={404: {"model": ErrorResponse}})
    async def get_model(self, model_id: str) -> ModelInfo:
        return await self.handler.model(model_id)

    @api.post("/predict", response_model=PredictResponse, responses=_errors)
    async def predict(self, request: PredictRequest) -> PredictResponse:
        return await self.handler.predict(request)
