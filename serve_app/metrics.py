"""Prometheus metrics of the ingress, through ``ray.serve.metrics``, tagged by model.

Exported on each Ray node's metrics endpoint beside Ray Serve's built-in
``ray_serve_*`` metrics (see README, Monitoring).
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class IngressMetrics:
    def __init__(self) -> None:
        self._requests = metrics.Counter(
            "mms_requests", description="Prediction requests, by model, API and HTTP status code.",
            tag_keys=("model", "api", "status"))
        self._errors = metrics.Counter(
            "mms_request_errors", description="Prediction requests that failed, by model, API and HTTP status code.",
            tag_keys=("model", "api", "status"))
        self._latency = metrics.Histogram(
            "mms_request_latency_ms", description="Prediction latency seen by the ingress, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model", "api"))

    def observe(self, model_id: str, api: str, status: int, seconds: float) -> None:
        tags = {"model": model_id, "api": api, "status": str(status)}
        self._requests.inc(tags=tags)
        if status >= 400:
            self._errors.inc(tags=tags)
        self._latency.observe(seconds * 1000.0, tags={"model": model_id, "api": api})
