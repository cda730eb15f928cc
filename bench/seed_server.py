"""The benchmark's baseline: the single-process design of the seed demo.

FastAPI on uvicorn in one process, an in-process LRU of two models, and
synchronous routes (FastAPI runs them in its thread pool), as the seed's
``app/server.py`` + ``manager.py`` + ``worker.py`` did. It uses the same
runtimes and transformers pipelines as the app, so the comparison is about
the serving design, not the model code.

    SEED_REGISTRY=config/models.json uvicorn bench.seed_server:app --port 8001
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from deployments.runtimes import ModelRuntime, runtime_for
from serve_app.core.errors import ModelNotFound
from serve_app.core.paths import resolve_project_path
from serve_app.core.registry import Modality, Registry

CAPACITY = 2

registry = Registry.from_file(os.environ.get("SEED_REGISTRY", "config/models.json"))
app = FastAPI(title="seed-style baseline")
_cache: OrderedDict[str, ModelRuntime] = OrderedDict()
_lock = threading.Lock()
loads = 0


class Body(BaseModel):
    model_id: str
    input_data: str | list[str]


@contextmanager
def _model(model_id: str) -> Iterator[ModelRuntime]:
    """The model, held for one request (taken under the lock, so an eviction cannot free it first)."""
    global loads
    with _lock:
        if model_id in _cache:
            _cache.move_to_end(model_id)
        else:
            if len(_cache) >= CAPACITY:
                _, old = _cache.popitem(last=False)
                old.unload()
            _cache[model_id] = runtime_for(registry.get(model_id)).load()
            loads += 1
        held = _cache[model_id].in_use()
        runtime = held.__enter__()
    try:
        yield runtime
    finally:
        held.__exit__(None, None, None)


@app.get("/models")
def models() -> dict:
    return {"models": registry.ids, "loaded": list(_cache), "loads": loads}


@app.post("/predict")
def predict(body: Body) -> dict:
    try:
        spec = registry.get(body.model_id)
    except ModelNotFound as e:
        raise HTTPException(404, e.message) from None
    items = [body.input_data] if isinstance(body.input_data, str) else body.input_data
    if spec.modality is Modality.IMAGE:
        items = [resolve_project_path(p).read_bytes() for p in items]
    with _model(spec.id) as runtime:
        predictions = runtime.predict(items)
    return {"model_id": spec.id, "predictions": predictions}
