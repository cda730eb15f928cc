"""The model-worker deployment: loads registry models on demand and runs them.

Each replica holds at most ``MAX_MODELS_PER_REPLICA`` models. Ray Serve's
model multiplexing routes a request to a replica that already holds its
model (the ``multiplexed_model_id`` set by the ingress), loads it on a miss,
and unloads the least recently used model when the replica is full; the
runtime's ``__del__`` then drops the weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve

from deployments.runtimes import ModelRuntime, runtime_for
from serve_app.errors import ModelUnavailable, ServeAppError
from serve_app.registry import Registry

logger = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 2


def configure_torch(num_threads: int | None) -> None:
    """Import torch and transformers at replica start, not on the first request, and size torch's thread pool."""
    import torch
    import transformers.pipelines  # noqa: F401  (heavy; imported once here)

    if num_threads:
        torch.set_num_threads(num_threads)
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    logger.info("torch %s on %s with %d threads", torch.__version__,
                "cuda" if torch.cuda.is_available() else "cpu", torch.get_num_threads())


@serve.deployment
class ModelWorker:
    def __init__(self, registry: Registry, torch_threads: int | None = None) -> None:
        configure_torch(torch_threads)
        self._registry = registry

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> ModelRuntime:
        spec = self._registry.get(model_id)
        runtime = runtime_for(spec)
        try:
            # Loading reads files and builds tensors: keep it off the event loop.
            await asyncio.to_thread(runtime.load)
        except Exception as e:
            logger.exception("loading model %r failed", model_id)
            raise ModelUnavailable(
                f"Model {model_id!r} could not be loaded: {type(e).__name__}: {e}",
                model_id=model_id,
            ) from None
        return runtime

    async def predict(self, inputs: list[Any]) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        runtime = await self.get_model(model_id)
        try:
            # Entered with no await in between: an LRU eviction cannot slip in before it.
            with runtime.in_use():
                predictions = await asyncio.to_thread(runtime.predict, inputs)
        except ServeAppError:
            raise
        except Exception as e:
            logger.exception("model %r failed on a request", model_id)
            raise ModelUnavailable(
                f"Model {model_id!r} failed on this input: {type(e).__name__}: {e}", model_id=model_id
            ) from None
        return {"model_id": runtime.spec.id, "task": runtime.spec.task.value, "predictions": predictions}
