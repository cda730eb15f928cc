"""The model workers' request router, on Ray Serve's public request-router API.

Serve runs one instance per deployment handle in each caller process (here: each ingress replica). For
every request it asks ``choose_replicas`` for ranked groups of replicas; this router builds a view of the
worker replicas (what each holds, from its pushed model ids and its own reported stats, corrected by what
this router has just sent, and by the explicit unloads it has just carried) and ranks them with
``policy.rank``.

It also keeps the ingress's view of the worker replicas (``views.view_of``): GET /models reads each
replica's own report from here, and calls meant for one replica (explicit unload, a fresh status) name it
in ``on_replica`` and go there.

Two rules from Serve's router code: an exception in ``choose_replicas`` would hang the request, so any
error falls back to every candidate; and every answer asks Serve to back off before it asks again, since
the groups returned already cover every candidate.

How busy a replica is: the requests this process has sent there and not seen completed, counted by
this router as Serve sends and completes them: in all (``on_send_request``, ``on_request_completed``), and
for each model (``_choose_replica_for_request``, ``on_request_completed``). Serve's own queue-length cache
is no measure here: over gRPC (throughput-optimized mode) the replica's count at acceptance arrives with
the answer and overwrites it. For the same reason Serve tells the router that a request was routed
(``on_request_routed``) only when its answer is back, too late to count it: which model went where is
recorded as Serve sends it, when the replica it chose for a request is known
(``_choose_replica_for_request``, one of two private methods overridden here: checked by
``serve_app.core.ray_internals``). The other, ``_fulfill_next_pending_request``, hands a chosen replica to a
waiting request: Serve's would hand the replica chosen for a call meant for one replica to another request.
A miss's placement and the eviction it causes are recorded when the router decides.

A replica that leaves the routing set is waited for, a little: Serve takes a replica out while it applies
a registry change (``reconfigure``, about a second), and a request for a model only it held would
otherwise load a copy elsewhere (seconds, and an eviction there) just before it comes back. For
``holder_grace_s`` after it left, such a request gets no replica (Serve backs off and asks again); after
that, or at once if Serve reports the replica's actor dead, it is a miss like any other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.routing import views
from deployments.routing.policy import Copy, DemandTracker, Replica, eviction, rank, worth_of
from serve_app.core.config import RoutingArgs
from serve_app.core.schemas import DECLARED_BYTES, ON_REPLICA, ROUTE, ModelState, ReplicaStatus, RouteHint, WorkerCall

logger = logging.getLogger("ray.serve")

HINTED = frozenset({WorkerCall.PREDICT.value, WorkerCall.LOAD.value})
"""The worker calls that take the router's ``RouteHint`` (``ROUTE``)."""

OWN_REPLICA_WAIT_S = 1.0
"""How long a hit waits for a holder that runs its model (policy.rank's ``wait_for_own``) before the holders
busy with other models are ranked after it: longer than a request queues in the router at saturation, so
that the rule applies where it matters (docs/performance.md). Past it, a holder that is
stuck, or full of requests that other routers (other ingress replicas) sent, cannot hold its model's
requests back, nor can the requests Serve's few routing tasks are holding keep other models' requests from
a free replica."""
PRUNE_AT = 4096
"""The size of the router's records (pairs of replica and model, requests in flight) past which it drops
those of replicas that left."""


class ModelAwareRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, **routing: object) -> None:
        """``routing``: the app's ``worker.routing`` args (``RoutingArgs``, the one home of their defaults)."""
        args = RoutingArgs.model_validate(routing)
        self._ray_default = args.policy == "ray_default"
        self._knobs = args
        self._demand = DemandTracker(args.demand_half_life_s)
        self._load_grace_s = args.load_grace_s
        self._last_used: dict[tuple[str, str], float] = {}  # (replica, model) -> when this router last sent
        # What each replica has been serving lately: requests sent, decayed, by (replica, model) and by replica
        self._recent = DemandTracker(args.affinity_half_life_s)
        self._recent_all = DemandTracker(args.affinity_half_life_s)
        # What this router's own misses change on a replica before the replica's pushed model ids show it:
        # the model it sent there, and the model Ray's LRU evicts there to make room. Each holds for
        # load_grace_s, whatever the pushed ids say meanwhile: they lag by up to several tenths of a second,
        # and ids pushed before a placement would undo it (see _view).
        self._assigned: dict[str, dict[str, float]] = {}  # replica -> model -> when sent
        self._evicting: dict[str, dict[str, float]] = {}
        # internal request id -> (replica, model) of each model call sent and not completed: concurrent
        # calls made for one ingress request share its id
        self._running: dict[str, list[tuple[str, str]]] = {}
        self._sent: dict[str, int] = {}  # replica -> model calls sent there, not completed yet
        self._prune_at = PRUNE_AT  # the size of its records at which it drops those of replicas gone
        # Calls for one replica (status, unload) are no load: the send Serve counts next, and their completions.
        self._uncounted_send: str | None = None
        self._uncounted: set[tuple[str, str]] = set()
        self._holder_grace_s = args.holder_grace_s
        self._reports: dict[str, tuple[object, ReplicaStatus]] = {}  # replica -> (its raw stats, parsed)
        # (replica, model) -> when a call for the model last completed there: a load under way there (one this
        # router placed, or one a report shows) is over once a call for its model completed after it began
        self._completed: dict[tuple[str, str], float] = {}
        self._sizes: dict[str, int] = {}  # model -> the bytes of a copy, as a replica last measured it
        self._away: dict[str, tuple[float, frozenset[str]]] = {}  # replica out of the routing set -> (since, held)
        # (replica, model) -> the victims a miss's placement there chose, and whether its hint names them (a
        # replica with a budget; without one they are Ray's LRU's own): for a request ranked again, sent later,
        # or never sent
        self._victims: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {}
        views.register(self._deployment_id.app_name, self._deployment_id.name, self)

    # -- the view of the replicas --------------------------------------------------------------------

    @property
    def replicas(self) -> list[RunningReplica]:
        """The running worker replicas, as Serve's controller last broadcast them."""
        return list(self.curr_replicas.values())

    def _calls_in_flight(self) -> Counter[tuple[str, str]]:
        """(replica, model) -> this router's model calls sent there and not completed."""
        return Counter(call for calls in self._running.values() for call in calls)

    def _view(self, replica: RunningReplica, now: float, in_flight: Counter[tuple[str, str]] | None = None) -> Replica:
        """``in_flight``: ``_calls_in_flight()``, counted once for every replica a decision looks at."""
        in_flight = self._calls_in_flight() if in_flight is None else in_flight
        rid = replica.replica_id.unique_id
        report = self._report(replica)
        reported = report.models if report is not None else {}
        pushed = set(replica.multiplexed_model_ids)
        assigned, evicting = self._assigned.setdefault(rid, {}), self._evicting.setdefault(rid, {})
        # The corrections expire by age alone. Pushed ids are no sign that one is done: ids pushed before a
        # model came back to a replica name it from its earlier stay, and ids pushed before a model came
        # lack it when it is about to leave again: a view would show three or four models on a replica of two
        # (docs/performance.md, how the router knows what each replica holds).
        for corrections in (assigned, evicting):
            for m in [m for m, at in corrections.items() if now - at >= self._load_grace_s]:
                del corrections[m]
        loading = self._loading(rid, report, assigned)
        held = (pushed | assigned.keys() | loading) - evicting.keys()
        copies = tuple(
            Copy(
                model_id=m,
                last_used=max(
                    self._last_used.get((rid, m), 0.0),
                    (reported[m].last_used_at or 0.0) if m in reported else 0.0,
                    assigned.get(m, 0.0),  # placed here, its request not sent yet
                ),
                in_flight=in_flight[(rid, m)],
                recent=self._recent.demand((rid, m), now),
                size=self._sizes.get(m, 0),
                loading=m in loading,
            )
            for m in held
        )
        backoff = frozenset(m for m, s in reported.items() if (s.retry_after or 0) > now)
        replica = Replica(
            rid,
            copies,
            in_flight=self._sent.get(rid, 0),
            recent=self._recent_all.demand(rid, now),
            slots=report.slots if report is not None else Replica.slots,
            backoff=backoff,
            budget=report.memory.budget_bytes if report is not None else None,
            held_elsewhere=report.memory.lingering_bytes if report is not None else 0,
        )
        if len(copies) > replica.slots:  # Ray's LRU keeps no more: the least recently used of them are gone
            replica = replace(replica, copies=tuple(sorted(copies, key=lambda c: -c.last_used)[: replica.slots]))
        return replica

    def _loading(self, rid: str, report: ReplicaStatus | None, assigned: dict[str, float]) -> set[str]:
        """The models whose load is under way on a replica, as far as this router knows: those it placed there
        (a miss: loading from then on) and those the replica's report shows loading, until a call for the model
        completes there after the load began. (A replica loads one model at a time: policy.rank.)"""
        began = dict(assigned)
        for m, status in (report.models if report is not None else {}).items():
            if status.state is ModelState.LOADING:
                began[m] = max(began.get(m, 0.0), report.at or 0.0)
        return {m for m, t in began.items() if self._completed.get((rid, m), 0.0) < t}

    def _report(self, replica: RunningReplica) -> ReplicaStatus | None:
        """What the replica last reported of itself (``ModelWorker.record_routing_stats``), parsed once per
        report; None before its first."""
        stats = replica.routing_stats
        if not stats or "models" not in stats:
            return None
        rid = replica.replica_id.unique_id
        cached = self._reports.get(rid)
        if cached is None or cached[0] is not stats:
            cached = (stats, ReplicaStatus.model_validate({**stats, "replica_id": rid}))
            self._reports[rid] = cached
            self._sizes = self._reported_sizes()
        return cached[1]

    def _reported_sizes(self) -> dict[str, int]:
        """Each model's bytes as the replicas' newest reports measured them, the newest report's where several
        did. A registry change of a model's files clears its sizes on every replica (``ModelCache.apply``), and
        so here: a size its old files measured is not the new files'."""
        sizes: dict[str, int] = {}
        for _, report in sorted(self._reports.values(), key=lambda cached: cached[1].at or 0.0):
            sizes.update({m: status.size_bytes for m, status in report.models.items() if status.size_bytes})
        return sizes

    def _size_of(self, model_id: str, pending: PendingRequest) -> int:
        """A copy's bytes: as a replica measured it, else as the registry declares it, else 0 (not known)."""
        return self._sizes.get(model_id) or pending.kwargs.get(DECLARED_BYTES) or 0

    def _ranked(
        self, candidates: Sequence[RunningReplica], pending: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        if pending is None:
            return [list(candidates)]
        by_id = {r.replica_id.unique_id: r for r in candidates}
        target = pending.kwargs.get(ON_REPLICA)
        model_id = pending.metadata.multiplexed_model_id
        if target is not None:  # a call for one replica: there, or nowhere
            return [[by_id[target]]] if target in by_id else []
        if not model_id:
            return [list(candidates)]
        if self._ray_default:  # as Ray's PowerOfTwoChoicesRequestRouter: two random replicas holding the model
            ids = [rid for rid in self.apply_multiplex_routing(pending_request=pending) if rid in self.curr_replicas]
            return [[self.curr_replicas[rid] for rid in random.sample(ids, min(2, len(ids)))]]
        now = time.time()  # the clock the replicas report last_used_at in
        in_flight = self._calls_in_flight()
        view = {r.replica_id.unique_id: self._view(r, now, in_flight) for r in candidates}
        if self._holder_away(model_id, view, now):
            return []
        waited = now - pending.created_at  # when the request reached this router
        size = self._size_of(model_id, pending)
        demand = lambda m: self._demand.demand(m, now)  # noqa: E731
        order = rank(
            model_id, list(view.values()), demand, self._knobs, wait_for_own=waited < OWN_REPLICA_WAIT_S, size=size
        )
        if order:
            top = view[order[0][0]]
            victims: tuple[Copy, ...] = ()
            refused = model_id in top.backoff or (top.budget is not None and size > top.budget)
            if top.copy_of(model_id) is None and not refused:  # a miss goes there: loading from now on, once its
                # victims are out (a model in its back-off there, or larger than its budget, is refused at once)
                victims = eviction(top, model_id, size, worth_of(list(view.values()), demand)) or ()
                for victim in victims:
                    self._evicting[top.replica_id][victim.model_id] = now
                self._place(top.replica_id, model_id, now, tuple(v.model_id for v in victims), top.budget is not None)
                holders = {r.replica_id: c.in_flight for r in view.values() if (c := r.copy_of(model_id)) is not None}
                if holders:  # a hot model's copy on one more replica: an event the operator sees in the log
                    logger.info(
                        "spreading model %r to replica %s: its holders had %s of its requests in flight",
                        model_id,
                        top.replica_id,
                        holders,
                    )
            if pending.metadata.call_method in HINTED:  # its threads are known once it is sent
                evict = self._placed_victims(top.replica_id, model_id)  # this ranking's, or an earlier one's
                pending.kwargs[ROUTE] = RouteHint(replica_id=top.replica_id, evict=evict, size_bytes=size or None)
        return [[by_id[rid] for rid in group] for group in order]

    def _placed_victims(self, rid: str, model_id: str) -> tuple[str, ...]:
        """The victims this router chose for its placement of ``model_id`` on ``rid``, while that placement
        holds (a request re-ranked after a back-off finds the model placed there: a hit, with no victims of
        its own to name)."""
        victims, named = self._victims.get((rid, model_id), ((), False))
        return victims if named and model_id in self._assigned.get(rid, {}) else ()

    def _idle_threads(self, rid: str, candidates: Sequence[RunningReplica]) -> int | None:
        """The threads a request may use on replica ``rid`` when it would run alone on an idle node: no request
        of this router's in flight on it nor on any other worker replica of its node, whose threads are then
        idle too (their sum: each replica's reported share). None otherwise: under load each replica keeps its
        own share. (With several ingress replicas, each router sees only the requests it sent.)"""
        node = next((r.node_id for r in candidates if r.replica_id.unique_id == rid), None)
        on_node = [r for r in self.curr_replicas.values() if r.node_id == node]
        if node is None or any(self._sent.get(r.replica_id.unique_id, 0) for r in on_node):
            return None
        shares = [(self._report(r).threads if self._report(r) is not None else 1) for r in on_node]
        return sum(shares) if len(shares) > 1 else None

    def _holder_away(self, model_id: str, view: dict[str, Replica], now: float) -> bool:
        """Whether no replica in the routing set holds the model but one that left it less than
        ``holder_grace_s`` ago did (it is applying a registry change, most likely: wait for it)."""
        if any(replica.copy_of(model_id) is not None for replica in view.values()):
            return False
        for rid in [rid for rid, (since, _) in self._away.items() if now - since >= self._holder_grace_s]:
            del self._away[rid]  # gone for good, or too long: its models are misses now
        return any(model_id in held for _, held in self._away.values())

    # -- the routing set -----------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new routing set: note the replicas that left it, and what they held."""
        now, present = time.time(), {r.replica_id.unique_id for r in replicas}
        for replica in self.replicas:  # the set before this update
            rid = replica.replica_id.unique_id
            if rid not in present:
                try:
                    held = frozenset(c.model_id for c in self._view(replica, now).copies)
                except Exception:  # a report it cannot read: what the replica pushed (Serve's update must run)
                    held = frozenset(replica.multiplexed_model_ids)
                self._away[rid] = (now, held)
        for rid in present:
            self._away.pop(rid, None)  # back (its update applied)
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._away.pop(replica_id.unique_id, None)  # nothing to wait for
        super().on_replica_actor_died(replica_id)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        await asyncio.sleep(0)  # let requests routed just before this one be counted first
        try:
            ranked = self._ranked(candidate_replicas, pending_request)
        except Exception:  # an exception here would hang the request: rank every candidate instead
            logger.exception("model-aware routing failed; routing to any replica")
            ranked = [list(candidate_replicas)]
        if pending_request is not None and not self._ray_default:
            pending_request.routing_context.should_backoff = True
        return ranked

    # -- what this router sends ----------------------------------------------------------------------

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        """Serve's step from the ranked groups to the one replica a request is sent to: on the path of
        ``handle.remote()`` (the ingress's only one), Serve sends it at once and calls
        ``on_request_completed`` for it exactly once. The moment this router learns which model goes where."""
        try:
            replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        except asyncio.CancelledError:  # never sent (its caller gave up): its ranking's placement is not made
            self._unplace(pending_request)
            raise
        rid = replica.replica_id.unique_id
        model_id = pending_request.metadata.multiplexed_model_id
        request_id = pending_request.metadata.internal_request_id
        if pending_request.kwargs.get(ON_REPLICA) is not None:
            if model_id and pending_request.metadata.call_method == WorkerCall.UNLOAD.value:  # gone before its
                self._evicting.setdefault(rid, {})[model_id] = time.time()  # push says so
                self._assigned.setdefault(rid, {}).pop(model_id, None)
            # A status or an unload for one replica: no load on it. Serve counts the send next, with no await
            # in between (on_send_request), and its completion later: neither counts.
            self._uncounted_send = rid
            self._uncounted.add((request_id, rid))
        elif model_id:
            if pending_request.metadata.call_method in HINTED and not self._ray_default:
                try:
                    pending_request.kwargs[ROUTE] = self._hint_at_send(pending_request, replica)
                except Exception:  # as in choose_replicas: the request goes, without what the router knows
                    logger.exception("model-aware routing failed; sending the request without a hint")
                    pending_request.kwargs[ROUTE] = None
            self._sending(request_id, rid, model_id)
        return replica

    def _hint_at_send(self, pending: PendingRequest, replica: RunningReplica) -> RouteHint:
        """The request's hint as it is sent to ``replica``: its ranking's where Serve sent it to the replica
        its ranking chose; else (a later group's replica, or one another request's ranking chose, which Serve
        may hand it) that ranking's placement is undone and the model placed here if this replica does not
        hold it, its victims this router's own placement's there, if any. The idle threads are counted now,
        with every request sent before this one (two requests ranked together on an idle node must not both
        take its threads)."""
        rid, model_id = replica.replica_id.unique_id, pending.metadata.multiplexed_model_id
        hint = pending.kwargs.get(ROUTE)
        if hint is None or hint.replica_id != rid:
            self._unplace(pending)
            now = time.time()
            if self._view(replica, now).copy_of(model_id) is None:  # a miss here, which no ranking placed here
                self._place(rid, model_id, now)
            size = hint.size_bytes if hint is not None else (self._size_of(model_id, pending) or None)
            hint = RouteHint(replica_id=rid, evict=self._placed_victims(rid, model_id), size_bytes=size)
        return replace(hint, threads=self._idle_threads(rid, self.replicas))

    def _place(self, rid: str, model_id: str, now: float, victims: tuple[str, ...] = (), named: bool = False) -> None:
        """A miss's copy on ``rid``: loading there from now on (evicted a moment ago or not), once ``victims`` are
        out (``named``: the replica has a budget, and the hint names them). A placement's victims are its own:
        an earlier placement's there, expired, named copies the replica may hold again by now."""
        self._evicting.setdefault(rid, {}).pop(model_id, None)
        self._assigned.setdefault(rid, {})[model_id] = now
        self._victims[(rid, model_id)] = (victims, named)

    def _unplace(self, pending: PendingRequest) -> None:
        """Undo the miss placement the request's ranking recorded (``_assigned``, its victims' ``_evicting``),
        unless a call for the model is in flight there (another request's load)."""
        hint, model_id = pending.kwargs.get(ROUTE), pending.metadata.multiplexed_model_id
        if hint is None or not model_id or (hint.replica_id, model_id) in self._calls_in_flight():
            return
        if self._assigned.get(hint.replica_id, {}).pop(model_id, None) is not None:
            for victim in self._victims.pop((hint.replica_id, model_id), ((), False))[0]:
                self._evicting.get(hint.replica_id, {}).pop(victim, None)

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Serve's step from a replica a routing task chose to the waiting request that gets it. FIFOMixin's
        would hand it to the oldest waiting request of the chosen request's model, else to the oldest of any:
        a call for one replica (``on_replica``: a status, an unload) could then reach another replica, and a
        replica chosen for such a call could carry a waiting prediction where the router did not place it.
        Here a call for one replica gets only that replica, and before any other request; the others keep
        FIFOMixin's order (the oldest of the same model, else the oldest), among themselves."""
        rid = replica.replica_id.unique_id
        model_id = getattr(request_metadata, "multiplexed_model_id", None)
        same_model = oldest = None
        for pending in self._pending_requests_to_fulfill:  # oldest first; answered ones are cleared lazily
            if pending.future.done():
                continue
            target = pending.kwargs.get(ON_REPLICA)
            if target == rid:
                return self._fulfill(pending, replica)
            if target is None:
                oldest = oldest or pending
                if same_model is None and model_id and pending.metadata.multiplexed_model_id == model_id:
                    same_model = pending
        if same_model is not None or oldest is not None:
            self._fulfill(same_model or oldest, replica)

    def _fulfill(self, pending: PendingRequest, replica: RunningReplica) -> None:
        """Give ``pending`` its replica, as Serve's own matching does, and clear the answered requests from the
        front of Serve's index of waiting requests by model, as its matching does when it looks one up
        (``_get_pending_request_matching_multiplexed_model_id``, which the matching above replaces): else every
        request, its inputs with it, would stay in that index for the ingress's life."""
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)
        model_id = pending.metadata.multiplexed_model_id
        waiting = self._pending_requests_by_model_id.get(model_id) if model_id else None
        while waiting and waiting[0].future.done():
            waiting.popleft()
        if waiting is not None and not waiting:
            del self._pending_requests_by_model_id[model_id]

    def _sending(self, request_id: str, rid: str, model_id: str) -> None:
        now = time.time()
        self._demand.add(model_id, now)
        self._recent.add((rid, model_id), now)
        self._recent_all.add(rid, now)
        self._last_used[(rid, model_id)] = now
        self._running.setdefault(request_id, []).append((rid, model_id))
        big = max(len(self._last_used), len(self._running), len(self._uncounted), len(self._victims))
        if big > self._prune_at:  # bounded
            live = {r.replica_id.unique_id for r in self.curr_replicas.values()}
            self._uncounted = {k for k in self._uncounted if k[1] in live}
            self._running = {k: calls for k, calls in self._running.items() if all(r in live for r, _ in calls)}
            self._last_used = {k: t for k, t in self._last_used.items() if k[0] in live}
            self._completed = {k: t for k, t in self._completed.items() if k[0] in live}
            self._assigned = {r: a for r, a in self._assigned.items() if r in live}
            self._victims = {k: v for k, v in self._victims.items() if k[1] in self._assigned.get(k[0], {})}
            self._evicting = {r: e for r, e in self._evicting.items() if r in live}
            self._sent = {r: n for r, n in self._sent.items() if r in live}
            self._reports = {r: p for r, p in self._reports.items() if r in live}
            self._recent.keep_only(lambda key: key[0] in live)
            self._recent_all.keep_only(lambda rid: rid in live)
            # What is left is live (a pool of many replicas and models): pruned again once it has doubled, not
            # on every request.
            left = max(len(self._last_used), len(self._running), len(self._uncounted), len(self._victims))
            self._prune_at = max(PRUNE_AT, 2 * left)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        if self._uncounted_send == replica_id.unique_id:
            self._uncounted_send = None
            return
        self._sent[replica_id.unique_id] = self._sent.get(replica_id.unique_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if (internal_request_id, replica_id.unique_id) in self._uncounted:
            self._uncounted.discard((internal_request_id, replica_id.unique_id))
        elif self._sent.get(replica_id.unique_id):  # every request sent completes once (rejected ones too)
            self._sent[replica_id.unique_id] -= 1
        calls = self._running.get(internal_request_id, [])
        for call in calls:
            # This replica's call (one a full replica rejected completes too). Serve names no model here:
            # the ingress makes one model call per request, so the replica tells the calls apart.
            if call[0] == replica_id.unique_id:
                calls.remove(call)
                self._completed[call] = time.time()
                break
        if not calls:
            self._running.pop(internal_request_id, None)
