"""Prometheus metrics of the model workers, through ``ray.serve.metrics``, tagged by model.

Ray adds the deployment, replica and application tags and exports them on
each node's metrics endpoint, beside Ray Serve's built-in metrics.
"""

from __future__ import annotations

from ray.serve import metrics

from serve_app.metrics import LATENCY_BOUNDARIES_MS


class WorkerMetrics:
    def __init__(self) -> None:
        tags = ("model",)
        self._hits = metrics.Counter(
            "mms_model_cache_hits", description="Predictions whose model was already loaded on the replica.",
            tag_keys=tags)
        self._loads = metrics.Counter(
            "mms_model_loads", description="Model loads on a replica, by outcome (ok or error).",
            tag_keys=("model", "outcome"))
        self._unloads = metrics.Counter(
            "mms_model_unloads", description="Models unloaded from a replica (LRU eviction or explicit unload).",
            tag_keys=tags)
        self._load_latency = metrics.Histogram(
            "mms_model_load_latency_ms", description="Time to load a model, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)

    def cache_hit(self, model_id: str) -> None:
        self._hits.inc(tags={"model": model_id})

    def loaded(self, model_id: str, seconds: float) -> None:
        self._loads.inc(tags={"model": model_id, "outcome": "ok"})
        self._load_latency.observe(seconds * 1000.0, tags={"model": model_id})

    def load_failed(self, model_id: str) -> None:
        self._loads.inc(tags={"model": model_id, "outcome": "error"})

    def unloaded(self, model_id: str) -> None:
        self._unloads.inc(tags={"model": model_id})
