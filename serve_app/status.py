"""Which worker replica holds which model, read from Ray Serve's own record.

Each worker replica reports the ids of the models it holds (or is loading)
to the Serve controller as soon as the set changes; the controller routes
requests by that record. Reading the same record here means ``GET /models``
shows what the replicas hold, not a guess kept in the ingress.
"""

from __future__ import annotations

import logging

import ray
from ray.serve._private.common import DeploymentID
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.handle import DeploymentHandle

from serve_app.schemas import ReplicaModels

logger = logging.getLogger("ray.serve")


class ReplicaModelRecord:
    def __init__(self, worker: DeploymentHandle) -> None:
        self._deployment_id = DeploymentID(name=worker.deployment_name, app_name=worker.app_name)
        self._controller = None

    async def replicas(self) -> list[ReplicaModels]:
        if self._controller is None:
            self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        running = await self._controller._all_running_replicas.remote()
        return [
            ReplicaModels(
                replica_id=info.replica_id.unique_id,
                node_id=info.node_id,
                models=sorted(info.multiplexed_model_ids),
            )
            for info in running.get(self._deployment_id, [])
        ]
