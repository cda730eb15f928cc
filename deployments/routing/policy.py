"""Where a request for a model should go: the placement policy, as a pure function.

The worker replicas are a pool of caches of two slots each, and Ray's LRU decides what a replica evicts
when it must load a model. This policy decides only which replica a request goes to:

* **hit**: a replica that holds the model: of those within ``spread_at`` requests of the least loaded,
  one that has not been serving other models more than this one lately (a replica batches one model at a
  time), then the one with the fewest requests of other models in flight, then the least loaded. When
  every holder has ``spread_at`` requests or more in flight, the model is hot: the request goes to a
  replica that can take another copy (one with a free slot first, else the one whose LRU victim is worth
  least), provided the copy is worth more than what it evicts. A hot model so spreads over replicas as
  its load grows; when the load falls, requests stick to the holder that served it last, and the idle
  copies become their replicas' LRU victims. A hit ranks no other replica: when its holders are full it
  waits for one, and loads no copy the policy did not choose; nor, while a holder that runs this model is
  within ``spread_at`` of the least loaded, the holders busy with other models, until the request has
  waited a little (the router's ``wait_for_own``).
* **miss**: a replica where the new copy fits as it is (a free slot, and its bytes within the replica's
  memory budget: the least loaded, then the emptiest, so that models arriving at an idle pool spread over
  its replicas), else the replica where it fits with the least value evicted (``eviction``); a replica
  with a load under way comes after every other where the copy can fit, for a replica loads one model at
  a time: a small model's miss does not wait behind a large model's load of many seconds.

A copy's worth is its model's recent demand (requests, exponentially decayed) shared among the model's
copies: a duplicate of a model that another replica keeps is the cheapest thing to evict, and the pool
behaves as one cache of 2 x replicas slots that keeps its most demanded models. Without a memory budget a
replica's victim is the one Ray's LRU takes (its least recently used copy), and a miss goes where that
victim is worth least. On a replica with a budget, a new copy needs a slot and its bytes: the copies to
evict are the set with the least worth that frees both, so one large, rarely used model goes before two
small, busy ones (the value per byte of Greedy-Dual-Size-Frequency, summed over what must go); the router
tells the replica which (``RouteHint.evict``), since Ray's LRU would take the least recently used. Ties
go to the copies used longest ago (plain LRU across the pool). A victim with requests still running on it
comes last: evicting it would keep its memory until they finish, so its bytes do not count as freed.

``rank`` returns replica ids in order of preference, one to a group, for Serve's
``RequestRouter.choose_replicas``; ``bench/simulate.py`` replays traces through the same function.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from serve_app.core.config import RoutingArgs


@dataclass(frozen=True)
class Copy:
    """A model held (or being loaded) by one replica."""

    model_id: str
    last_used: float  # when this replica last served it (Ray's LRU order on the replica)
    in_flight: int = 0  # its requests running on this replica
    recent: float = 0.0  # its requests sent to this replica lately (counted, exponentially decayed)
    size: int = 0  # its bytes (0: not known yet)
    loading: bool = False  # its load is under way on this replica


@dataclass(frozen=True)
class Replica:
    replica_id: str
    copies: tuple[Copy, ...] = ()
    in_flight: int = 0  # every request in flight on this replica
    recent: float = 0.0  # every request sent to this replica lately (counted as Copy.recent is)
    slots: int = 2
    backoff: frozenset[str] = field(default_factory=frozenset)  # models whose last load here failed, recently
    budget: int | None = None  # bytes its models may take (None: no budget, the count alone)
    held_elsewhere: int = 0  # bytes of copies evicted but not freed yet (requests still run on them)

    def copy_of(self, model_id: str) -> Copy | None:
        return next((c for c in self.copies if c.model_id == model_id), None)

    @property
    def loading(self) -> bool:
        """Whether a load is under way here: a replica loads one model at a time, so another waits for it."""
        return any(c.loading for c in self.copies)

    def serving_others(self, copy: Copy) -> bool:
        """Whether this replica has been serving other models more than ``copy``'s lately (at least one
        request's worth, after decay): it is running their batches."""
        others = self.recent - copy.recent
        return others >= 1.0 and others > copy.recent

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.copies)

    @property
    def used(self) -> int:
        """Bytes its copies take, those evicted but still in use included."""
        return sum(c.size for c in self.copies) + self.held_elsewhere

    def fits(self, size: int) -> bool:
        """Whether a new copy of ``size`` bytes fits as it is: a free slot, and the bytes."""
        return self.free_slots > 0 and (self.budget is None or self.used + size <= self.budget)


def eviction(replica: Replica, model_id: str, size: int, worth: Callable[[Copy], float]) -> tuple[Copy, ...] | None:
    """The copies to evict on ``replica`` so that a new copy of ``model_id`` of ``size`` bytes fits: none when
    it fits as it is; on a replica without a budget, the least recently used copy (what Ray's LRU takes, by
    count); on one with a budget, the set of copies with the least worth that frees a slot and the bytes (a
    copy with requests in flight frees its slot but not its bytes, and goes last); None when it cannot fit."""
    if replica.budget is not None and size > replica.budget:
        return None
    if replica.fits(size):
        return ()
    candidates = [c for c in replica.copies if c.model_id != model_id]
    if replica.budget is None:  # the count alone: Ray's LRU takes the least recently used copy
        return (min(candidates, key=lambda c: c.last_used),) if candidates else None
    best: tuple | None = None
    for n in range(1, len(candidates) + 1):
        for victims in itertools.combinations(candidates, n):
            slots = replica.free_slots + len(victims)
            freed = sum(c.size for c in victims if c.in_flight == 0)
            if slots <= 0 or (replica.budget is not None and replica.used - freed + size > replica.budget):
                continue
            key = (
                sum(c.in_flight > 0 for c in victims),
                sum(worth(c) for c in victims),
                len(victims),
                max(c.last_used for c in victims),
            )
            if best is None or key < best[0]:
                best = (key, victims)
    return None if best is None else best[1]


Knobs = RoutingArgs
r"""The policy's settings are the app's routing args (``worker.routing`` in serve_config.yaml), their one
home: ``spread_at`` is read here, the half-lives by the ``DemandTracker``\ s the router keeps."""


_DEFAULT_KNOBS = Knobs()

Demand = Callable[[str], float]
"""A model's recent demand: its requests, exponentially decayed (``DemandTracker.demand``)."""


def worth_of(replicas: Sequence[Replica], demand: Demand) -> Callable[[Copy], float]:
    """A copy's worth: its model's recent demand, shared among the model's copies over ``replicas``."""
    copies: dict[str, int] = {}
    for r in replicas:
        for c in r.copies:
            copies[c.model_id] = copies.get(c.model_id, 0) + 1
    return lambda c: demand(c.model_id) / copies.get(c.model_id, 1)


def rank(
    model_id: str,
    replicas: Sequence[Replica],
    demand: Demand,
    knobs: Knobs | None = None,
    wait_for_own: bool = True,
    size: int = 0,
) -> list[list[str]]:
    """Replica ids for a request for ``model_id`` (``size`` bytes a copy, 0 if not known), best first, one per
    group. ``wait_for_own``: leave out the holders busy with other models while a holder that runs this model
    comes first (the router stops that once the request has waited a little, so that a stuck or full holder
    cannot hold its requests back)."""
    knobs = knobs or _DEFAULT_KNOBS
    worth = worth_of(replicas, demand)

    def place_order(candidates: Sequence[Replica]) -> list[tuple[Replica, tuple[Copy, ...]]]:
        """Where a new copy goes, with what it evicts: where it fits as it is (least loaded first), then
        where it evicts the least worth; where it can never fit, last."""
        placed = [(r, eviction(r, model_id, size, worth)) for r in candidates]
        free = sorted(
            ((r, e) for r, e in placed if e == ()), key=lambda p: (p[0].in_flight, -p[0].free_slots, p[0].replica_id)
        )
        full = [(r, e) for r, e in placed if e]
        full.sort(
            key=lambda p: (
                sum(c.in_flight > 0 for c in p[1]),
                sum(worth(c) for c in p[1]),
                max(c.last_used for c in p[1]),
                p[0].replica_id,
            )
        )
        never = sorted(((r, ()) for r, e in placed if e is None), key=lambda p: p[0].replica_id)
        fit = free + full
        return [p for p in fit if not p[0].loading] + [p for p in fit if p[0].loading] + never

    holders = [r for r in replicas if r.copy_of(model_id) is not None]
    others = [r for r in replicas if r.copy_of(model_id) is None]
    if not holders:
        failed = [r for r in others if model_id in r.backoff]  # answers 503 at once, evicting nothing
        order = failed + [r for r, _ in place_order([r for r in others if model_id not in r.backoff])]
        return [[r.replica_id] for r in order]

    # Among the holders within spread_at requests of the least loaded, one that has not been serving other
    # models more than this one lately: a replica runs one model's batch at a time, so two hot models on two
    # replicas settle one on each, in larger batches than when both run everywhere. (Requests of other
    # models in flight are no measure of that alone: a replica's batch answers its requests together, and
    # a replica with nothing in flight for a moment would take any model's next request.) The test is
    # coarse on purpose: a copy of one hot model on a replica that served others long ago (or little) is as
    # good as its first holder, and the load decides. Then the fewest requests of other models in flight,
    # then the least loaded; on a tie the one that served the model last, so idle copies age.
    # Only the holders are ranked (and the replica chosen for a new copy): a request for a held model
    # never falls through to another replica, where Serve would load a copy this policy did not choose (it
    # moves to the next group when a holder is full or misses its queue probe's deadline); it waits for a
    # holder.
    least = min(r.in_flight for r in holders)

    def hit_order(r: Replica) -> tuple:
        this_model = r.copy_of(model_id)
        return (
            r.in_flight > least + knobs.spread_at,
            r.serving_others(this_model),
            r.in_flight - this_model.in_flight,
            r.in_flight,
            -this_model.last_used,
            r.replica_id,
        )

    holders.sort(key=hit_order)
    held_by = len(holders)
    # When the first holder is one that runs this model (within spread_at of the least loaded, by the order
    # above), the holders busy with other models are left out: a request waits for a replica running its
    # model rather than take a slot beside another model's batches when that holder is full (at saturation,
    # when every replica has max_ongoing_requests in flight). A holder more than spread_at busier than a
    # replica running other models still lets the request go there (it sorts after it), and so does a
    # request that has waited long enough (``wait_for_own`` false): the others then follow as later groups.
    if wait_for_own and not holders[0].serving_others(holders[0].copy_of(model_id)):
        holders = [r for r in holders if not r.serving_others(r.copy_of(model_id))]
    order = holders
    if least >= knobs.spread_at:
        # The model is hot: another copy, where it fits and is worth more than what it evicts.
        new_copy_worth = demand(model_id) / (held_by + 1)
        spread = [
            r
            for r, evicted in place_order(others)
            if r.in_flight < knobs.spread_at
            and evicted is not None
            and (r.fits(size) or (evicted and sum(worth(c) for c in evicted) < new_copy_worth))
        ]
        if spread:
            order = [spread[0], *holders]
    return [[r.replica_id] for r in order]


class DemandTracker:
    """Requests counted by key (a model; a replica and a model), exponentially decayed with a half-life:
    recent demand, cheap to keep."""

    def __init__(self, half_life_s: float) -> None:
        self._tau = half_life_s / math.log(2)
        self._value: dict[Hashable, float] = {}
        self._at: dict[Hashable, float] = {}

    def add(self, key: Hashable, now: float) -> None:
        self._value[key] = self.demand(key, now) + 1.0
        self._at[key] = now

    def demand(self, key: Hashable, now: float) -> float:
        value = self._value.get(key)
        if value is None:
            return 0.0
        return value * math.exp(-max(0.0, now - self._at[key]) / self._tau)  # a clock that stepped back: no growth

    def keep_only(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget the keys ``keep`` rejects (to keep the bookkeeping bounded)."""
        self._value = {k: v for k, v in self._value.items() if keep(k)}
        self._at = {k: t for k, t in self._at.items() if k in self._value}
