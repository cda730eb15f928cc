"""Which worker replica holds which model, as the replicas themselves report it.

The worker deployment's router (deployments/routing) lives in this ingress process and knows the running
worker replicas, each with the model status it last reported (``record_routing_stats``, which Serve's
controller collects every ``routing.stats_period_s``). Probes and listings read that, through a snapshot
at most ``FRESH_S`` old, so a probe loop, however fast, asks nothing of the replicas that have reported.
A replica that has not reported yet (it started less than a stats period ago), and every replica after a
load or an unload (the data plane asks for a fresh look), is asked directly, by a call the router sends
to it and to no other; until Serve's next poll of that replica, its answer stands (each report is
numbered), so that a listing does not go back to what the replica reported before. Readiness counts the
running replicas from Serve's public ``serve.status()``, which also tells whether the ingress replicas are
still applying a change (Serve reports the ingress deployment UPDATING until every replica has run
``reconfigure``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.routing import views
from serve_app.core import ray_internals
from serve_app.core.schemas import ON_REPLICA, ReplicaStatus, WorkerCall

logger = logging.getLogger("ray.serve")

ASK_TIMEOUT_S = 5.0
FRESH_S = 1.0
"""How long one look at the replicas answers probes and listings."""
GONE_CHECK_S = 1.0
"""How often a call sent to one replica by name, once that replica is out of the router's set, asks Serve's
controller whether it still runs."""
LIVE_REPLICA_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION"})


class ReplicaGone(Exception):
    """The replica a call was sent to by name left the running replicas (it died, or Serve stopped it) before
    it answered: the router, which sends such a call there and nowhere else, would hold it until its timeout."""


class _Snapshot:
    """One value, refreshed at most every FRESH_S seconds, by one caller at a time; after ``invalidate``, the
    next read fetches it fresh."""

    def __init__(self, fetch) -> None:
        self._fetch, self._value, self._at, self._lock = fetch, None, float("-inf"), asyncio.Lock()
        self._invalid = False

    def invalidate(self) -> None:
        self._invalid = True

    async def get(self, fresh: bool = False):
        async with self._lock:
            fresh, self._invalid = fresh or self._invalid, False
            if fresh or time.monotonic() - self._at > FRESH_S:
                self._value, self._at = await self._fetch(fresh), time.monotonic()
            return self._value


def later(polled: dict[str, Any], asked: dict[str, Any]) -> dict[str, Any]:
    """Of a replica's two reports, Serve's last poll and its answer when last asked, the later one."""
    return asked if asked.get("report", 0) > polled.get("report", 0) else polled


def _status(replica_id: str, node_id: str | None, stats: dict[str, Any], held: set[str]) -> ReplicaStatus:
    """A replica's report; a replica that has not reported yet shows what it pushed to the router."""
    if "models" not in stats:
        stats = {**stats, "models": {m: {"state": "loaded"} for m in held}}
    return ReplicaStatus.model_validate({**stats, "replica_id": replica_id, "node_id": node_id})


class ReplicaDirectory:
    def __init__(self, worker: DeploymentHandle, ingress: str | None = None) -> None:
        """``ingress``: the ingress deployment's name, whose rollouts ``ingress_updating`` tells."""
        self._worker, self._ingress = worker, ingress
        self._asked: dict[str, dict[str, Any]] = {}  # each replica's answer when last asked directly
        self._statuses = _Snapshot(self._look)
        self._app = _Snapshot(self._app_status)

    async def _router(self) -> Any | None:
        """The worker deployment's router in this process; None while it has none, because no worker replica
        has answered a call yet (the app is starting: its worker replicas are not running)."""
        router = views.view_of(self._worker.app_name, self._worker.deployment_name)
        if router is None:  # a handle makes its router at its first call
            try:
                await asyncio.wait_for(getattr(self._worker, WorkerCall.STATUS.value).remote(), ASK_TIMEOUT_S)
            except TimeoutError:
                logger.warning("no worker replica answered within %gs: none listed", ASK_TIMEOUT_S)
            router = views.view_of(self._worker.app_name, self._worker.deployment_name)
        return router

    def changed(self) -> None:
        """A replica's models changed (a request loaded one, or failed to): the next listing or probe asks the
        replicas, so that it shows the change at once, not at Serve's next poll of their reports."""
        self._statuses.invalidate()

    async def statuses(self, fresh: bool = False) -> list[ReplicaStatus]:
        """Every running worker replica's own record of its models: a snapshot at most FRESH_S old, or,
        with ``fresh``, asked of each replica now."""
        return await self._statuses.get(fresh)

    async def _look(self, fresh: bool) -> list[ReplicaStatus]:
        router = await self._router()
        replicas = router.replicas if router is not None else []

        async def look(r: Any) -> ReplicaStatus:
            stats = r.routing_stats or {}
            if fresh or "models" not in stats:  # asked now; so is a replica Serve has not polled yet (it just
                return await self._ask(r)  # started: what it pushed does not show a failed load or counts)
            # An answer later than Serve's last poll (an unload's fresh look): a listing does not go back to before it.
            stats = later(stats, self._asked.get(r.replica_id.unique_id, {}))
            return _status(r.replica_id.unique_id, r.node_id, stats, set(r.multiplexed_model_ids))

        running = {r.replica_id.unique_id for r in replicas}
        self._asked = {rid: stats for rid, stats in self._asked.items() if rid in running}
        return list(await asyncio.gather(*(look(r) for r in replicas)))

    async def _ask(self, replica: Any) -> ReplicaStatus:
        rid = replica.replica_id.unique_id
        try:
            call = getattr(self._worker, WorkerCall.STATUS.value).remote(**{ON_REPLICA: rid})
            stats = await self._pinned(call, rid, ASK_TIMEOUT_S)
            if stats.get("replica_id") != rid:  # never another replica's report under this one's id
                raise RuntimeError(f"replica {stats.get('replica_id')} answered instead")
            self._asked[rid] = stats
        except Exception as e:  # a replica that is starting or dying: what it last reported
            logger.warning("replica %s did not report its models: %r", rid, e)  # repr: a TimeoutError has no text
            stats = later(replica.routing_stats or {}, self._asked.get(rid, {}))
        return _status(rid, replica.node_id, stats, set(replica.multiplexed_model_ids))

    async def running_count(self) -> int:
        """Running worker replicas (a snapshot at most FRESH_S old); none while Serve's status cannot be read."""
        deployments = await self._app.get()
        worker = deployments.get(self._worker.deployment_name) if deployments is not None else None
        return worker.replica_states.get("RUNNING", 0) if worker else 0

    async def ingress_updating(self) -> bool:
        """Whether Serve is still updating ingress replicas (reconfigure included), as it last reported; while
        its status cannot be read, yes (that every replica runs a registry is then not known)."""
        deployments = await self._app.get()
        if deployments is None:
            return True
        ingress = deployments.get(self._ingress) if self._ingress else None
        return ingress is not None and ingress.status == "UPDATING"

    async def _app_status(self, fresh: bool) -> dict[str, Any] | None:
        """The app's deployments in Serve's public status (``serve.status()`` blocks: in a thread, for at most
        ASK_TIMEOUT_S); None, logged, when Serve's controller does not answer it (it is restarting): the
        probe says not ready (503), not a server error."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), ASK_TIMEOUT_S)
        except Exception as e:
            logger.warning("Serve's status could not be read (%s): no worker replica counted as running", e)
            return None
        app = status.applications.get(self._worker.app_name)
        return dict(app.deployments) if app else {}

    async def unload(self, model_id: str, replica_id: str, timeout_s: float = ASK_TIMEOUT_S) -> bool:
        """Unload a model from one replica (the router sends the call there and nowhere else), within
        ``timeout_s`` (TimeoutError); ReplicaGone if that replica leaves the running ones first (its copy went
        with it)."""
        handle = self._worker.options(multiplexed_model_id=model_id)
        call = getattr(handle, WorkerCall.UNLOAD.value).remote(**{ON_REPLICA: replica_id})
        return await self._pinned(call, replica_id, timeout_s)

    def _routed(self, replica_id: str) -> bool:
        router = views.view_of(self._worker.app_name, self._worker.deployment_name)
        return router is None or any(r.replica_id.unique_id == replica_id for r in router.replicas)

    async def _stopped(self, replica_id: str) -> bool:
        """Whether Serve's controller no longer lists the replica as running (it died, or was stopped). One that
        applies a registry change is out of the router's set for a while, and still runs; where the controller
        cannot be asked, it is taken to run."""
        try:
            details = await asyncio.to_thread(ray_internals.serve_instance_details)
            app = details["applications"][self._worker.app_name]
            replicas = app["deployments"][self._worker.deployment_name]["replicas"]
        except Exception as e:
            logger.warning("Serve's replicas could not be read (%r): replica %s taken to run", e, replica_id)
            return False
        return not any(r.get("replica_id") == replica_id and r.get("state") in LIVE_REPLICA_STATES for r in replicas)

    async def _pinned(self, call: Any, replica_id: str, timeout_s: float) -> Any:
        """A call sent to one replica by name: its answer within ``timeout_s`` (TimeoutError), or ReplicaGone
        as soon as the replica has stopped (out of the router's set, and no longer running by Serve's
        controller, asked every GONE_CHECK_S): the router would hold the call until its timeout. Either way
        the call is cancelled."""
        task = asyncio.ensure_future(call)
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError
                done, _ = await asyncio.wait({task}, timeout=min(GONE_CHECK_S, left))
                if done:
                    return task.result()
                if not self._routed(replica_id) and await self._stopped(replica_id):
                    raise ReplicaGone(replica_id)
        finally:
            if not task.done():
                task.cancel()
