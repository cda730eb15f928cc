"""Request handling, apart from HTTP: look up, decode, dispatch to the workers, shape the answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from serve_app.codecs import InputDecoder
from serve_app.config import AppArgs
from serve_app.errors import ModelUnavailable, RequestTimeout, ServeAppError, unwrap
from serve_app.registry import ModelSpec, Registry
from serve_app.schemas import (
    ModelInfo,
    ModelList,
    ModelState,
    Prediction,
    PredictResponse,
    ReplicaModels,
    ReplicaStatus,
)
from serve_app.status import ReplicaModelRecord

logger = logging.getLogger("ray.serve")

_REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


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
            url_fetch=args.url_fetch,
        )
        self.record = ReplicaModelRecord(worker)

    # -- dispatch -----------------------------------------------------------------------------

    async def _call_once(self, method: str, model_id: str, *args: Any) -> Any:
        response = getattr(self.worker.options(multiplexed_model_id=model_id), method).remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the timeout fired: cancel the work on the replica too
            raise

    async def _call(self, method: str, model_id: str, *args: Any) -> Any:
        """Call a worker method for a model; retry once if the replica died under the request."""
        for attempt in (1, 2):
            try:
                return await self._call_once(method, model_id, *args)
            except Exception as e:
                inner = unwrap(e)
                if isinstance(inner, ServeAppError):
                    raise inner from None
                if not isinstance(e, _REPLICA_GONE):
                    raise
                if attempt == 2:
                    raise ModelUnavailable(
                        f"The worker replica serving {model_id!r} died; retry the request", model_id=model_id
                    ) from None
                logger.warning("worker replica died during a %s of %r (%s); retrying once", method, model_id,
                               type(e).__name__)

    async def _with_timeout(self, model_id: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"Model {model_id!r} did not answer within {self.timeout_s:g}s", model_id=model_id
            ) from None

    # -- predictions ----------------------------------------------------------------------------

    async def predict_raw(self, spec: ModelSpec, input_data: str | list[str]) -> dict[str, Any]:
        inputs = await self.decoder.decode(spec.modality, input_data)
        return await self._with_timeout(spec.id, self._call("predict", spec.id, inputs))

    async def predict(self, model_id: str, input_data: str | list[str]) -> PredictResponse:
        result = await self.predict_raw(self.registry.get(model_id), input_data)
        return PredictResponse(
            model_id=result["model_id"],
            task=result["task"],
            predictions=[Prediction.from_scores(scores) for scores in result["predictions"]],
        )

    # -- explicit load and unload -----------------------------------------------------------------

    async def load(self, model_id: str) -> ModelInfo:
        self.registry.get(model_id)
        await self._with_timeout(model_id, self._call("load", model_id))
        return await self.model(model_id)

    async def unload(self, model_id: str, rounds: int = 20) -> ModelInfo:
        """Unload a model from every replica that holds it."""
        self.registry.get(model_id)
        for _ in range(rounds):
            holders = self._holders(model_id, await self.record.replicas())
            if not holders:
                break
            # Ray routes each call to a replica that holds the model, while its routing record says so.
            await asyncio.gather(*(self._call("unload", model_id) for _ in holders))
            await asyncio.sleep(0.2)  # replicas push their model ids to the router every 0.1 s
        return await self.model(model_id)

    # -- status ----------------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, int]:
        replicas = await self.record.running_count()
        return replicas > 0, replicas

    async def models(self) -> ModelList:
        replicas = await self.record.replicas()
        return ModelList(
            models=[self._info(spec, replicas) for spec in self.registry.models],
            replicas=[ReplicaModels(replica_id=r.replica_id, node_id=r.node_id, models=r.held) for r in replicas],
        )

    async def model(self, model_id: str) -> ModelInfo:
        spec = self.registry.get(model_id)
        return self._info(spec, await self.record.replicas())

    @staticmethod
    def _holders(model_id: str, replicas: list[ReplicaStatus]) -> list[str]:
        return [r.replica_id for r in replicas if model_id in r.held]

    @classmethod
    def _info(cls, spec: ModelSpec, replicas: list[ReplicaStatus]) -> ModelInfo:
        views = [r.models[spec.id] for r in replicas if spec.id in r.models]
        holders = [r.replica_id for r in replicas if r.models.get(spec.id) and r.models[spec.id].state is ModelState.LOADED]

        newest_load = max((v for v in views if v.last_loaded_at), key=lambda v: v.last_loaded_at, default=None)
        newest_error = max((v for v in views if v.last_error_at), key=lambda v: v.last_error_at, default=None)
        last_loaded = newest_load.last_loaded_at if newest_load else None
        if holders:
            state = ModelState.LOADED
        elif any(v.state is ModelState.LOADING for v in views):
            state = ModelState.LOADING
        elif newest_error and (last_loaded is None or newest_error.last_error_at > last_loaded):
            state = ModelState.FAILED
        else:
            state = ModelState.NOT_LOADED
        used = [v.last_used_at for v in views if v.last_used_at is not None]
        return ModelInfo(
            id=spec.id,
            task=spec.task,
            input_modality=spec.modality,
            description=spec.description,
            labels=spec.labels,
            source=spec.source.describe(),
            preload=spec.preload,
            state=state,
            loaded=bool(holders),
            replicas=holders,
            load_count=sum(v.load_count for v in views),
            unload_count=sum(v.unload_count for v in views),
            last_loaded_at=last_loaded,
            last_load_seconds=newest_load.last_load_seconds if newest_load else None,
            last_used_at=max(used, default=None),
            last_error=newest_error.last_error if newest_error else None,
        )
