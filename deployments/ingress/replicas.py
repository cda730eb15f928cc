"""Which worker replica holds which model, asked of the replicas themselves.

For ``GET /models`` the ingress asks every running worker replica for its own record of its models
(``record_routing_stats`` of ``ModelWorker``, the method Serve's controller polls too), so the answer is
what the replicas hold now, not a guess kept in the ingress. Ray has no public API that lists a
deployment's replicas: that goes through ``serve_app.core.ray_internals``. Readiness counts the running
replicas from Serve's public ``serve.status()``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serve_app.core import ray_internals
from serve_app.core.schemas import ReplicaCounters, ReplicaModelStatus, ReplicaStatus

logger = logging.getLogger("ray.serve")

ASK_TIMEOUT_S = 5.0
FRESH_S = 1.0
"""How long one look at the replicas answers probes and listings: a probe loop, however fast, asks
Serve's controller and the replicas at most once a second."""


class _Snapshot:
    """One value, refreshed at most every FRESH_S seconds, by one caller at a time."""

    def __init__(self, fetch) -> None:
        self._fetch, self._value, self._at, self._lock = fetch, None, float("-inf"), asyncio.Lock()

    async def get(self, fresh: bool = False):
        async with self._lock:
            if fresh or time.monotonic() - self._at > FRESH_S:
                self._value, self._at = await self._fetch(), time.monotonic()
            return self._value


class ReplicaDirectory:
    def __init__(self, app_name: str, deployment_name: str) -> None:
        self._app_name = app_name
        self._deployment_name = deployment_name
        self._actors: dict[str, object] = {}
        self._statuses = _Snapshot(self._ask_all)
        self._running_count = _Snapshot(self._count_running)

    async def _refs(self) -> list[ray_internals.ReplicaRef]:
        return await ray_internals.running_replicas(self._app_name, self._deployment_name)

    async def _ask(self, ref: ray_internals.ReplicaRef) -> ReplicaStatus:
        status = ReplicaStatus(replica_id=ref.replica_id, node_id=ref.node_id)
        try:
            actor = self._actors.get(ref.actor_name)
            if actor is None:
                actor = self._actors[ref.actor_name] = await ray_internals.replica_actor(ref.actor_name)
            stats = await asyncio.wait_for(actor.record_routing_stats.remote(), ASK_TIMEOUT_S)
            status.models = {m: ReplicaModelStatus.model_validate(s) for m, s in stats.get("models", {}).items()}
            status.counters = ReplicaCounters.model_validate(stats.get("counters", {}))
        except Exception as e:  # a replica that is starting or dying: fall back to its routing record
            logger.warning("replica %s did not report its models: %s", status.replica_id, e)
            status.models = {m: ReplicaModelStatus(state="loaded") for m in ref.model_ids}
        return status

    async def running_count(self) -> int:
        """Running worker replicas (a snapshot at most FRESH_S old)."""
        return await self._running_count.get()

    async def _count_running(self) -> int:
        """From Serve's public status (``serve.status()`` blocks: in a thread)."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self._app_name)
        deployment = app.deployments.get(self._deployment_name) if app else None
        return deployment.replica_states.get("RUNNING", 0) if deployment else 0

    async def statuses(self, fresh: bool = False) -> list[ReplicaStatus]:
        """Every running replica's own record of its models (a snapshot at most FRESH_S old, unless
        ``fresh``)."""
        return await self._statuses.get(fresh)

    async def _ask_all(self) -> list[ReplicaStatus]:
        refs = await self._refs()
        live = {ref.actor_name for ref in refs}
        self._actors = {name: a for name, a in self._actors.items() if name in live}
        return list(await asyncio.gather(*(self._ask(ref) for ref in refs)))
