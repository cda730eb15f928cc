"""Which worker replica holds which model, asked of the replicas themselves.

Ray Serve's controller knows the running worker replicas (and the model ids
each one reported for routing). For ``GET /models`` the ingress asks every
running replica for its own record of its models (``record_routing_stats``
of ``ModelWorker``, the method Serve's controller polls too), so the answer
is what the replicas hold now, not a guess kept in the ingress.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.serve._private.common import DeploymentID
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.handle import DeploymentHandle

from serve_app.schemas import ReplicaModelStatus, ReplicaStatus

logger = logging.getLogger("ray.serve")

ASK_TIMEOUT_S = 5.0


class ReplicaModelRecord:
    def __init__(self, worker: DeploymentHandle) -> None:
        self._deployment_id = DeploymentID(name=worker.deployment_name, app_name=worker.app_name)
        self._controller = None
        self._actors: dict[str, ray.actor.ActorHandle] = {}

    async def _running(self) -> list:
        if self._controller is None:
            self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        running = await self._controller._all_running_replicas.remote()
        return running.get(self._deployment_id, [])

    async def _ask(self, info) -> ReplicaStatus:
        status = ReplicaStatus(replica_id=info.replica_id.unique_id, node_id=info.node_id)
        try:
            actor = self._actors.get(info.actor_name)
            if actor is None:
                actor = self._actors[info.actor_name] = ray.get_actor(info.actor_name, namespace=SERVE_NAMESPACE)
            stats = await asyncio.wait_for(actor.record_routing_stats.remote(), ASK_TIMEOUT_S)
            status.models = {m: ReplicaModelStatus.model_validate(s) for m, s in stats.get("models", {}).items()}
        except Exception as e:  # a replica that is starting or dying: fall back to its routing record
            logger.warning("replica %s did not report its models: %s", status.replica_id, e)
            status.models = {m: ReplicaModelStatus(state="loaded") for m in info.multiplexed_model_ids}
        return status

    async def running_count(self) -> int:
        return len(await self._running())

    async def replicas(self) -> list[ReplicaStatus]:
        infos = await self._running()
        live = {info.actor_name for info in infos}
        self._actors = {name: a for name, a in self._actors.items() if name in live}
        return list(await asyncio.gather(*(self._ask(info) for info in infos)))
