"""The application's Prometheus metrics, through ``ray.serve.metrics``, tagged by model and task.

Ray adds the application, deployment and replica tags and exports them on each node's metrics
endpoint beside Ray Serve's built-in ``ray_serve_*`` metrics (docs/operations.md lists them all).
The ingress's data plane records the requests; the worker replicas record loads, unloads and cache hits.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]

UNKNOWN_MODEL = "(unknown)"
"""The model (and task) tag of a request naming no registered model: tag values never come from the request."""


class IngressMetrics:
    def __init__(self) -> None:
        self._requests = metrics.Counter(
            "mms_requests",
            description="Prediction requests, by model, API and status code.",
            tag_keys=("model", "task", "api", "status"),
        )
        self._errors = metrics.Counter(
            "mms_request_errors",
            description="Prediction requests that failed, by model, API and status code.",
            tag_keys=("model", "task", "api", "status"),
        )
        self._latency = metrics.Histogram(
            "mms_request_latency_ms",
            description="Prediction latency seen by the ingress, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "task", "api"),
        )

    def observe(self, model_id: str, task: str, api: str, status: int, seconds: float) -> None:
        tags = {"model": model_id, "task": task, "api": api, "status": str(status)}
        self._requests.inc(tags=tags)
        if status >= 400:
            self._errors.inc(tags=tags)
        self._latency.observe(seconds * 1000.0, tags={"model": model_id, "task": task, "api": api})


class WorkerMetrics:
    def __init__(self) -> None:
        self._hits = metrics.Counter(
            "mms_model_cache_hits",
            description="Predictions whose model was already loaded on the replica.",
            tag_keys=("model",),
        )
        self._loads = metrics.Counter(
            "mms_model_loads",
            description="Model loads on a replica, by outcome (ok or error).",
            tag_keys=("model", "task", "outcome"),
        )
        self._unloads = metrics.Counter(
            "mms_model_unloads",
            description="Models unloaded from a replica (LRU eviction or explicit unload).",
            tag_keys=("model", "task"),
        )
        self._load_latency = metrics.Histogram(
            "mms_model_load_latency_ms",
            description="Time to load a model, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "task"),
        )
        self._size = metrics.Gauge(
            "mms_model_size_bytes",
            description="Bytes of a model loaded on a replica (its weights, else its load's growth of resident "
            "memory); 0 once unloaded.",
            tag_keys=("model", "task"),
        )

        self._memory_used = metrics.Gauge(
            "mms_replica_memory_used_bytes",
            description="Bytes a worker replica's models take (the copies it holds, and those still in use).",
        )
        self._memory_budget = metrics.Gauge(
            "mms_replica_memory_budget_bytes",
            description="Bytes a worker replica's models may take (worker.memory_bytes less its baseline).",
        )

    def memory(self, used_bytes: int, budget_bytes: int | None) -> None:
        self._memory_used.set(used_bytes)
        if budget_bytes is not None:
            self._memory_budget.set(budget_bytes)

    def cache_hit(self, model_id: str) -> None:
        self._hits.inc(tags={"model": model_id})

    def loaded(self, model_id: str, task: str, seconds: float, size_bytes: int | None) -> None:
        self._loads.inc(tags={"model": model_id, "task": task, "outcome": "ok"})
        self._load_latency.observe(seconds * 1000.0, tags={"model": model_id, "task": task})
        self._size.set(size_bytes or 0, tags={"model": model_id, "task": task})

    def load_failed(self, model_id: str, task: str) -> None:
        self._loads.inc(tags={"model": model_id, "task": task, "outcome": "error"})

    def revived(self, model_id: str, task: str, size_bytes: int | None) -> None:
        """A copy evicted while requests ran on it, taken back before it was freed: its size is held again."""
        self._size.set(size_bytes or 0, tags={"model": model_id, "task": task})

    def unloaded(self, model_id: str, task: str) -> None:
        self._unloads.inc(tags={"model": model_id, "task": task})
        self._size.set(0, tags={"model": model_id, "task": task})
