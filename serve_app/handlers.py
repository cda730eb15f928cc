"""Request handling, apart from HTTP: look up, decode, dispatch, shape the answer."""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from serve_app.codecs import InputDecoder
from serve_app.config import AppArgs
from serve_app.errors import RequestTimeout, unwrap
from serve_app.registry import ModelSpec, Registry
from serve_app.schemas import ModelInfo, ModelList, Prediction, PredictRequest, PredictResponse, ReplicaModels
from serve_app.status import ReplicaModelRecord


class ModelHandler:
    def __init__(self, registry: Registry, worker: DeploymentHandle, args: AppArgs) -> None:
        self.registry = registry
        self.worker = worker
        self.timeout_s = args.request_timeout_s
        self.decoder = InputDecoder(
            image_root=args.image_root,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            max_items=args.max_list_items,
        )
        self.record = ReplicaModelRecord(worker)

    async def predict(self, request: PredictRequest) -> PredictResponse:
        spec = self.registry.get(request.model_id)
        inputs = self.decoder.decode(spec.modality, request.input_data)
        response = self.worker.options(multiplexed_model_id=spec.id).predict.remote(inputs)
        try:
            result = await asyncio.wait_for(response, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeout(
                f"Model {spec.id!r} did not answer within {self.timeout_s:g}s", model_id=spec.id
            ) from None
        except Exception as e:
            raise unwrap(e) from None
        return PredictResponse(
            model_id=result["model_id"],
            task=result["task"],
            predictions=[Prediction.from_scores(scores) for scores in result["predictions"]],
        )

    async def models(self) -> ModelList:
        replicas = await self.record.replicas()
        return ModelList(models=[self._info(spec, replicas) for spec in self.registry.models], replicas=replicas)

    async def model(self, model_id: str) -> ModelInfo:
        spec = self.registry.get(model_id)
        return self._info(spec, await self.record.replicas())

    @staticmethod
    def _info(spec: ModelSpec, replicas: list[ReplicaModels]) -> ModelInfo:
        holders = [r.replica_id for r in replicas if spec.id in r.models]
        return ModelInfo(
            id=spec.id,
            task=spec.task,
            input_modality=spec.modality,
            description=spec.description,
            labels=spec.labels,
            source=spec.source.describe(),
            loaded=bool(holders),
            replicas=holders,
        )
