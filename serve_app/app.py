"""The application builder named by ``serve_config.yaml`` (``import_path: serve_app.app:build_app``).

``serve run serve_config.yaml`` validates the ``args`` mapping against ``AppArgs`` and calls
``build_app``, which reads the registry once and binds the two deployments: the HTTP ingress and the
model workers it dispatches to. This is the only module that imports both deployments.
"""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.ingress.deployment import Ingress
from deployments.worker.deployment import ModelWorker
from serve_app.core import ray_internals
from serve_app.core.config import AppArgs
from serve_app.core.registry import Registry

ROUTER = "deployments.routing.router:ModelAwareRouter"
"""The worker deployment's request router; Serve imports it in each caller (the ingress replicas)."""


def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):  # called from Python with a plain mapping
        args = AppArgs.model_validate(args or {})
    ray_internals.check()
    cap = ray_internals.replica_grpc_max_message_bytes()
    if cap is not None and args.largest_worker_message() > cap:
        raise ValueError(
            f"a request within this app's limits can reach {args.largest_worker_message()} bytes between replicas, "
            f"more than Serve's gRPC message cap of {cap}: raise RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH "
            "(config/serve.env) or lower max_body_bytes, max_image_bytes, max_list_items or max_text_chars"
        )
    registry = Registry.from_file(args.registry_path)
    w = args.worker
    scaling: dict = {"num_replicas": w.num_replicas}
    if w.autoscaling is not None:
        scaling = {"autoscaling_config": w.autoscaling.model_dump()}
    if w.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = w.max_replicas_per_node
    router = RequestRouterConfig(
        request_router_class=ROUTER,
        request_router_kwargs=w.routing.model_dump(exclude={"stats_period_s"}),
        request_routing_stats_period_s=w.routing.stats_period_s,
    )
    worker = ModelWorker.options(
        max_ongoing_requests=w.max_ongoing_requests,
        ray_actor_options={"num_cpus": w.num_cpus, "num_gpus": w.num_gpus},
        request_router_config=router,
        **scaling,
    ).bind(registry, w.torch_threads, w.batching, w.load_failure_backoff_s)
    i = args.ingress
    return Ingress.options(
        num_replicas=i.num_replicas,
        max_ongoing_requests=i.max_ongoing_requests,
        ray_actor_options={"num_cpus": i.num_cpus},
    ).bind(worker, registry, args)
