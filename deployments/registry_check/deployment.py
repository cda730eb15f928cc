"""The registry check: one small replica that fails Serve's update when a registry change is bad.

The ingress and worker replicas refuse a bad registry by keeping the one they run: a ``reconfigure`` that
raised would make Serve stop them. (Measured on Ray 2.60: a running replica whose ``reconfigure`` raises on
a new ``user_config`` is stopped; Serve starts replacements with the same ``user_config``, which fail too;
after three failed starts per target replica the update is DEPLOY_FAILED ("replicas of the previous version
keep running until a new deploy"), and the replicas it had not reached yet serve on. Nothing is rolled
back: the replica that raised is gone with its models, and an ingress of one replica would leave no
ingress at all.) Refusing quietly would leave ``serve status`` at RUNNING.

This deployment takes the same ``user_config``, checks it with the same code, and raises on a bad one,
with the messages of start-up: Serve stops its replica, fails its update, and ``serve status`` (and a
RayService's status) shows the application DEPLOY_FAILED with those messages in this deployment's
message, while the ingress and the workers serve on with the registry they had. The next good registry
starts it again.

It reserves no CPU and takes no requests: the builder binds it into the application only so that Serve
deploys it with the app.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from serve_app.core import logs
from serve_app.core.config import RegistryRules
from serve_app.core.live_registry import parse_user_config

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class RegistryCheck:
    def __init__(self, rules: RegistryRules | None = None) -> None:
        logs.in_replica()
        self.rules = rules or RegistryRules()  # the app's tasks, allowed runtime modules and model budget
        self.version: str | None = None

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Raise ``RegistryError``, naming every bad field, if ``user_config`` carries no valid registry. (As
        in the other deployments, asking for ``rank`` makes Serve call this at start even without a
        user_config.)"""
        registry, self.version = parse_user_config(user_config, self.rules.catalog(), self.rules.model_budget_bytes)
        logger.info("registry %s is valid: %d models", self.version, len(registry.models))
