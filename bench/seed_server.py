"""The benchmark's baseline: the single-process design of the seed demo.

FastAPI on uvicorn in one process, an in-process LRU of two models, and
synchronous routes (FastAPI runs them in its thread pool), as the seed's
``app/server.py`` + ``manager.py`` + ``worker.py`` did. It uses the same
runtimes and output shaping as the app, so the comparison is about the
serving design, not the model code.

    SEED_REGISTRY=config/models.json uvicorn bench.seed_server:app --port 8001
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from deployments.runtimes import ModelRuntime, runtime_for
from serve_app.core.errors import ModelNotFound
from serve_app.core.inputs import IMAGE
from serve_app.core.paths import resolve_project_path
from serve_app.core.registry import Registry
from serve_app.core.tasks import TaskCatalog

CAPACITY = 2

REGISTRY = os.environ.get("SEED_REGISTRY", "config/models.json")
# The bench's own models lie beside its registry, besides the app's model roots (models/); the smoke fleet's
# runtime module (bench.sized_runtime) is allowed as the bench registry names it.
catalog = TaskCatalog.load(
    runtime_modules=["bench.sized_runtime"], model_roots=["models", str(resolve_project_path(REGISTRY).parent)]
)
registry = Registry.from_file(REGISTRY, catalog)
app = FastAPI(title="seed-style baseline")


@dataclass
class _Entry:
    """A loaded model: one call at a time on it (a model is not safe to call from several threads), while
    other models' calls run at once; evicted while in use, it is unloaded when its last call is done."""

    runtime: ModelRuntime
    calls: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    evicted: bool = False


_cache: OrderedDict[str, _Entry] = OrderedDict()
_lock = threading.Lock()
loads = 0
model_calls, model_seconds = 0, 0.0  # as the app's worker replicas count them (ReplicaCounters.model_seconds)


class Body(BaseModel):
    model_id: str
    input_data: str | list[str]


@contextmanager
def _model(model_id: str) -> Iterator[ModelRuntime]:
    """The model's runtime, held for one request (taken under the lock, so an eviction cannot free it first);
    a third model evicts the least recently used."""
    global loads
    with _lock:
        if model_id in _cache:
            _cache.move_to_end(model_id)
        else:
            if len(_cache) >= CAPACITY:
                _, old = _cache.popitem(last=False)
                old.evicted = True
                if old.users == 0:
                    old.runtime.unload()
            runtime = runtime_for(registry.get(model_id), catalog)
            runtime.load()
            _cache[model_id] = _Entry(runtime)
            loads += 1
        entry = _cache[model_id]
        entry.users += 1
    try:
        with entry.calls:
            yield entry.runtime
    finally:
        with _lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                entry.runtime.unload()


@app.get("/models")
def models() -> dict:
    return {
        "models": registry.ids,
        "loaded": list(_cache),
        "loads": loads,
        "model_calls": model_calls,
        "model_seconds": model_seconds,
    }


@app.post("/predict")
def predict(body: Body) -> dict:
    try:
        spec = registry.get(body.model_id)
    except ModelNotFound as e:
        raise HTTPException(404, e.message) from None
    items = [body.input_data] if isinstance(body.input_data, str) else body.input_data
    task = catalog.task_of(spec)
    if task.input is IMAGE:
        items = [resolve_project_path(p).read_bytes() for p in items]
    global model_calls, model_seconds
    with _model(spec.id) as runtime:
        start = time.perf_counter()
        outputs = task.output.encode(runtime.predict(runtime.prepare(items)))
        seconds = time.perf_counter() - start
    with _lock:
        model_calls, model_seconds = model_calls + 1, model_seconds + seconds
    predictions = task.output.native(outputs, len(items))
    return {"model_id": spec.id, "task": spec.task, "predictions": predictions}
