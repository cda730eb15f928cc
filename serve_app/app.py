"""The application builder named by ``serve_config.yaml`` (``import_path: serve_app.app:build_app``).

``serve run serve_config.yaml`` validates the ``args`` mapping against ``AppArgs`` and calls
``build_app``, which reads the registry and binds the deployments: the HTTP ingress, the model workers it
dispatches to, and the registry check. This is the only module that imports the deployments.

The registry reaches the replicas as Serve's ``user_config`` of the three deployments, never as an
argument of their constructors: a deploy that changes only the ``user_config`` (``make reload``, a
RayService's ``serveConfigV2``: ``serve_app.reload``) changes the registry in the running replicas
without restarting them. A bad registry stops the build here, with messages that name its fields.

An app with auth off is built only when Serve listens on a loopback address (``listen_refusal``): the
build fails, with that one line as the reason, when the running Serve's ``http_options.host`` (with none
running yet, the default address of the one ``serve.run`` will start) is any other address.
"""

from __future__ import annotations

import logging

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.ingress.deployment import Ingress
from deployments.registry_check.deployment import RegistryCheck
from deployments.worker.cache import MAX_MODELS_PER_REPLICA
from deployments.worker.deployment import ModelWorker
from serve_app.core import ray_internals
from serve_app.core.config import AppArgs, RegistryRules, default_http_host, listen_refusal
from serve_app.core.live_registry import registry_user_config
from serve_app.core.registry import read_registry_file

logger = logging.getLogger("ray.serve")

ROUTER = "deployments.routing.router:ModelAwareRouter"
"""The worker deployment's request router; Serve imports it in each caller (the ingress replicas)."""

REGISTRY_DEPLOYMENTS = (Ingress.name, ModelWorker.name, RegistryCheck.name)
"""The deployments whose ``user_config`` is the registry."""

GRACE_OVER_TIMEOUT_S = 5.0
"""How much longer than ``request_timeout_s`` a worker replica that Serve stops may take to finish."""


def registry_config(path: str, rules: RegistryRules | None = None) -> dict:
    """The ``user_config`` of the registry deployments: the registry file's content, checked against the
    app's rules (``RegistryError``, naming each bad field, if it is not a valid registry)."""
    rules = rules or RegistryRules()
    data, _ = read_registry_file(path, rules.catalog(), rules.model_budget_bytes)
    return registry_user_config(data, origin=path)


def build_app(args: AppArgs) -> Application:
    if not isinstance(args, AppArgs):  # called from Python with a plain mapping
        args = AppArgs.model_validate(args or {})
    ray_internals.check()
    # With no Serve instance yet (``serve.run(build_app(...))`` from Python), the one serve.run starts listens
    # on Ray's default address. An empty host is every interface; None, HTTP off.
    host = ray_internals.serve_http_host(default=default_http_host())
    refusal = listen_refusal(host, args.auth)
    if refusal is not None:
        raise ValueError(f"refusing to start: {refusal}")
    cap = ray_internals.replica_grpc_max_message_bytes()
    if cap is not None and args.largest_worker_message() > cap:
        raise ValueError(
            f"a request within this app's limits can reach {args.largest_worker_message()} bytes between replicas, "
            f"more than Serve's gRPC message cap of {cap}: raise RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH "
            "(config/serve.env) or lower max_body_bytes, max_image_bytes, max_list_items or max_text_chars"
        )
    entry = ray_internals.grpc_entry_max_message_bytes()
    if entry < args.max_body_bytes:
        raise ValueError(
            f"Serve's gRPC entry takes messages of at most {entry} bytes, less than max_body_bytes "
            f"({args.max_body_bytes}): raise RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (config/serve.env) to max_body_bytes"
        )
    if entry > args.max_body_bytes:
        logger.warning(
            "Serve's gRPC entry reads messages of up to %d bytes before this app refuses those over max_body_bytes "
            "(%d): set RAY_SERVE_GRPC_MAX_MESSAGE_SIZE to max_body_bytes (config/serve.env) to refuse them unread",
            entry,
            args.max_body_bytes,
        )
    # Imports the task modules (a missing one stops the build here) and checks the registry against them.
    registry = registry_config(args.registry_path, args.registry_rules)
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
    actor: dict = {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus}
    if w.memory_bytes is not None:
        actor["memory"] = w.memory_bytes  # Ray's scheduler reserves what each replica keeps its models within
    else:
        logger.warning(
            "worker.memory_bytes is not set: each worker replica holds at most %d models whatever their size, "
            "with no memory budget (docs/configuration.md: sizing replicas)",
            MAX_MODELS_PER_REPLICA,
        )
    worker = ModelWorker.options(
        max_ongoing_requests=w.max_ongoing_requests,
        # A replica that Serve stops (a scale-down, a redeploy) finishes what it runs first: no request may
        # run longer than request_timeout_s, so none that could still be answered is cut off (Serve's 20 s
        # default would cut a request, and the load it waits for, short).
        graceful_shutdown_timeout_s=args.request_timeout_s + GRACE_OVER_TIMEOUT_S,
        health_check_period_s=args.health_check_period_s,
        ray_actor_options=actor,
        request_router_config=router,
        user_config=registry,
        **scaling,
    ).bind(w, args.registry_rules, args.request_timeout_s)
    check = RegistryCheck.options(user_config=registry).bind(args.registry_rules)
    i = args.ingress
    return Ingress.options(
        num_replicas=i.num_replicas,
        max_ongoing_requests=i.max_ongoing_requests,
        health_check_period_s=args.health_check_period_s,
        ray_actor_options={"num_cpus": i.num_cpus},
        user_config=registry,
    ).bind(worker, check, args)
