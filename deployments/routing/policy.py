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
* **miss**: a replica with a free slot first (the least loaded, then the emptiest: models arriving at an
  idle pool spread over its replicas), else the replica whose LRU victim is worth least.

A copy's worth is its model's recent demand (requests, exponentially decayed) shared among the model's
copies: a duplicate of a model that another replica keeps is the cheapest thing to evict, and the pool
behaves as one cache of 2 x replicas slots that keeps its most demanded models. Ties go to the copy used
longest ago (plain LRU across the pool). A victim with requests still running on it comes last: evicting
it would keep its memory until they finish.

``rank`` returns replica ids in order of preference, one to a group, for Serve's
``RequestRouter.choose_replicas``; ``bench/simulate.py`` replays traces through the same function.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Replica:
    replica_id: str
    copies: tuple[Copy, ...] = ()
    in_flight: int = 0  # every request in flight on this replica
    recent: float = 0.0  # every request sent to this replica lately (counted as Copy.recent is)
    slots: int = 2
    backoff: frozenset[str] = field(default_factory=frozenset)  # models whose last load here failed, recently

    def copy_of(self, model_id: str) -> Copy | None:
        return next((c for c in self.copies if c.model_id == model_id), None)

    def serving_others(self, copy: Copy) -> bool:
        """Whether this replica has been serving other models more than ``copy``'s lately (at least one
        request's worth, after decay): it is running their batches."""
        others = self.recent - copy.recent
        return others >= 1.0 and others > copy.recent

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.copies)

    @property
    def victim(self) -> Copy | None:
        """What Ray's LRU would evict here to load another model: nothing while a slot is free."""
        return None if self.free_slots > 0 else min(self.copies, key=lambda c: c.last_used)


Knobs = RoutingArgs
r"""The policy's settings are the app's routing args (``worker.routing`` in serve_config.yaml), their one
home: ``spread_at`` is read here, the half-lives by the ``DemandTracker``\ s the router keeps."""


_DEFAULT_KNOBS = Knobs()

Demand = Callable[[str], float]
"""A model's recent demand: its requests, exponentially decayed (``DemandTracker.demand``)."""


def rank(
    model_id: str,
    replicas: Sequence[Replica],
    demand: Demand,
    knobs: Knobs | None = None,
    wait_for_own: bool = True,
) -> list[list[str]]:
    """Replica ids for a request for ``model_id``, best first, one per group. ``wait_for_own``: leave out the
    holders busy with other models while a holder that runs this model comes first (the router stops that
    once the request has waited a little, so that a stuck or full holder cannot hold its requests back)."""
    knobs = knobs or _DEFAULT_KNOBS
    copies: dict[str, int] = {}
    for r in replicas:
        for c in r.copies:
            copies[c.model_id] = copies.get(c.model_id, 0) + 1

    def worth(c: Copy) -> float:
        return demand(c.model_id) / copies.get(c.model_id, 1)

    def place_order(candidates: Sequence[Replica]) -> list[Replica]:
        """Where a new copy goes: free slots (least loaded first), then the cheapest victim."""
        free = sorted(
            (r for r in candidates if r.free_slots > 0), key=lambda r: (r.in_flight, -r.free_slots, r.replica_id)
        )
        full = [r for r in candidates if r.free_slots <= 0]
        full.sort(key=lambda r: (r.victim.in_flight > 0, worth(r.victim), r.victim.last_used, r.replica_id))
        return free + full

    holders = [r for r in replicas if r.copy_of(model_id) is not None]
    others = [r for r in replicas if r.copy_of(model_id) is None]
    if not holders:
        failed = [r for r in others if model_id in r.backoff]  # answers 503 at once, evicting nothing
        order = failed + place_order([r for r in others if model_id not in r.backoff])
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
        new_copy_worth = demand(model_id) / (held_by + 1)
        spread = [
            r
            for r in place_order(others)
            if r.in_flight < knobs.spread_at and (r.free_slots > 0 or worth(r.victim) < new_copy_worth)
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
