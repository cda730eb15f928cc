"""The placement policy the model workers' router and the simulator share (deployments/routing/policy.py)."""

import math

import pytest

from deployments.routing.policy import Copy, DemandTracker, Knobs, Replica, rank


def R(replica_id, *copies, in_flight=0, backoff=()):
    """A replica whose recent requests are its copies' (``C(..., recent=)``), and no other's."""
    recent = sum(c.recent for c in copies)
    return Replica(replica_id, tuple(copies), in_flight=in_flight, recent=recent, backoff=frozenset(backoff))


def C(model_id, last_used, in_flight=0, recent=0.0):
    return Copy(model_id, last_used, in_flight, recent)


def no_demand(model_id):
    return 0.0


def first(order):
    return order[0][0]


def flat(order):
    return [group[0] for group in order]


# -- hits -------------------------------------------------------------------------------------------


def test_a_hit_goes_to_the_least_loaded_holder():
    replicas = [R("a", C("m", 5), in_flight=3), R("b", C("m", 4), in_flight=1), R("c", C("x", 9))]
    assert flat(rank("m", replicas, no_demand)) == ["b", "a"]  # and never c: a hit loads no copy elsewhere


def test_idle_holders_tie_on_the_one_that_served_the_model_last_so_the_other_copy_ages():
    replicas = [R("a", C("m", 5)), R("b", C("m", 8))]
    assert first(rank("m", replicas, no_demand)) == "b"


def test_two_hot_models_on_the_same_replicas_settle_one_on_each_for_larger_batches():
    """A replica batches one model at a time: a request goes to the holder with the fewest requests of
    other models in flight, though it is a little busier."""
    replicas = [
        R("a", C("m", 5, in_flight=1), C("n", 5, in_flight=4), in_flight=5),
        R("b", C("m", 4, in_flight=6), C("n", 4), in_flight=6),
    ]
    assert flat(rank("m", replicas, no_demand)) == ["b", "a"]
    assert flat(rank("n", replicas, no_demand)) == ["a", "b"]


def test_two_hot_models_stay_one_on_each_replica_while_a_replica_has_nothing_in_flight():
    """Between batches a replica may have nothing in flight: what it has been serving lately still
    decides, not the emptier queue, so the other model's requests do not slip in."""
    replicas = [
        R("a", C("m", 5, recent=90.0), C("n", 6, recent=10.0)),
        R("b", C("m", 4, in_flight=2, recent=20.0), C("n", 3, recent=80.0), in_flight=2),
    ]
    assert flat(rank("m", replicas, no_demand)) == ["a"]  # b, busy with n, is no fallback: m waits for a
    assert flat(rank("n", replicas, no_demand)) == ["b"]


def test_at_saturation_a_request_waits_for_a_replica_running_its_model():
    """Every replica full (max_ongoing_requests 16): a request for m is ranked only to the replica running
    m, so that when a slot frees on the replica running n it does not join n's replica (Serve would move to
    the next group while the first is full)."""
    replicas = [
        R("a", C("m", 5, in_flight=16, recent=90.0), C("n", 6, recent=5.0), in_flight=16),
        R("b", C("m", 4, recent=5.0), C("n", 3, in_flight=14, recent=90.0), in_flight=14),
    ]
    assert flat(rank("m", replicas, no_demand)) == ["a"]
    assert flat(rank("n", replicas, no_demand)) == ["b"]


def test_a_request_that_has_waited_may_go_to_a_holder_busy_with_another_model_after_its_own():
    """A holder that runs the model may be stuck, or full of other routers' requests: once the request has
    waited (wait_for_own false), the other holders follow as later groups."""
    replicas = [
        R("a", C("m", 5, in_flight=3, recent=90.0), in_flight=3),
        R("b", C("m", 4, recent=5.0), C("n", 3, recent=90.0)),
        R("c", C("m", 2, in_flight=1, recent=1.0), C("x", 3, recent=40.0), in_flight=1),
    ]
    assert flat(rank("m", replicas, no_demand)) == ["a"]
    assert flat(rank("m", replicas, no_demand, wait_for_own=False)) == ["a", "b", "c"]


def test_a_hot_models_copy_on_a_replica_that_served_others_long_ago_shares_the_load_at_once():
    """What a replica served counts only while it is recent (decayed below one request's worth, it is
    nothing): a new copy of a hot model there takes requests as soon as it is less loaded."""
    replicas = [
        R("a", C("m", 9, in_flight=3, recent=120.0), in_flight=3),
        R("b", C("m", 8, recent=0.3), C("x", 1, recent=0.6), in_flight=0),
    ]
    assert first(rank("m", replicas, no_demand)) == "b"


def test_a_replica_busy_with_another_model_gets_a_hit_only_past_spread_at():
    """A holder that has been running another model's batches takes this model's requests only when the
    holder running this one is more than spread_at busier, even while its own batch's answers are all back
    (nothing in flight)."""
    b = R("b", C("m", 8, recent=2.0), C("x", 9, recent=60.0))
    busy = [R("a", C("m", 9, in_flight=4, recent=120.0), in_flight=4), b]
    assert first(rank("m", busy, no_demand, Knobs(spread_at=4))) == "a"
    busier = [R("a", C("m", 9, in_flight=5, recent=120.0), in_flight=5), b]
    assert first(rank("m", busier, no_demand, Knobs(spread_at=4))) == "b"


def test_a_holder_more_than_spread_at_busier_than_the_least_loaded_comes_after_it_whatever_it_runs():
    replicas = [
        R("a", C("m", 5, in_flight=9, recent=50.0), C("n", 5), in_flight=9),
        R("b", C("m", 4), C("n", 4, in_flight=4, recent=50.0), in_flight=4),
    ]
    assert flat(rank("m", replicas, no_demand, Knobs(spread_at=4))) == ["b", "a"]
    assert flat(rank("m", replicas, no_demand, Knobs(spread_at=5))) == ["a"]  # b runs n: no fallback


def test_a_hot_model_spreads_to_a_free_slot_once_its_holders_are_busy():
    replicas = [R("a", C("m", 5, in_flight=4), in_flight=4), R("b", C("x", 1))]
    assert flat(rank("m", replicas, lambda m: 10.0, Knobs(spread_at=4))) == ["b", "a"]
    # below the threshold it stays on its holder
    replicas = [R("a", C("m", 5, in_flight=3), in_flight=3), R("b", C("x", 1))]
    assert flat(rank("m", replicas, lambda m: 10.0, Knobs(spread_at=4))) == ["a"]


def test_a_hot_model_takes_a_full_replica_only_from_a_model_worth_less_than_its_new_copy():
    demand = {"hot": 20.0, "cold": 1.0, "warm": 15.0}.get
    busy = R("a", C("hot", 5, in_flight=6), in_flight=6)
    assert first(rank("hot", [busy, R("b", C("cold", 1), C("warm", 2))], demand)) == "b"  # evicts cold (1 < 10)
    worth_more = {"hot": 20.0, "warm": 15.0, "warm2": 12.0}.get  # each worth more than the new copy's 10
    assert first(rank("hot", [busy, R("b", C("warm", 1), C("warm2", 2))], worth_more)) == "a"


def test_a_hot_model_does_not_spread_to_a_replica_that_is_busy_itself():
    replicas = [R("a", C("m", 5), in_flight=5), R("b", C("n", 5), in_flight=5)]
    assert flat(rank("m", replicas, lambda m: 10.0)) == ["a"]  # its requests wait for a: b is no fallback


# -- misses -----------------------------------------------------------------------------------------


def test_a_miss_goes_to_a_free_slot_first_the_least_loaded_of_them():
    replicas = [R("a", C("x", 1), C("y", 2)), R("b", C("z", 3), in_flight=2), R("c", in_flight=1)]
    assert flat(rank("m", replicas, no_demand)) == ["c", "b", "a"]


def test_on_an_idle_pool_a_miss_goes_to_the_emptiest_replica():
    replicas = [R("a", C("x", 1)), R("b")]
    assert first(rank("m", replicas, no_demand)) == "b"


def test_a_miss_on_full_replicas_evicts_the_least_recently_used_model_of_the_pool():
    # Same demand everywhere: the pool's least recently used model goes, as in one LRU of six slots.
    replicas = [R("a", C("x", 5), C("y", 9)), R("b", C("z", 2), C("w", 7)), R("c", C("v", 4), C("u", 8))]
    assert flat(rank("m", replicas, no_demand)) == ["b", "c", "a"]


def test_a_miss_evicts_a_duplicate_before_the_only_copy_of_a_model():
    demand = {"x": 4.0, "dup": 6.0}.get
    replicas = [R("a", C("x", 1), C("k", 9)), R("b", C("dup", 2), C("k2", 9)), R("c", C("dup", 5), C("k3", 9))]
    # x: 4 for its only copy; dup: 6 shared by two copies, 3 each: a copy of dup is worth less.
    assert first(rank("m", replicas, lambda m: demand(m) or 8.0)) == "b"


def test_a_miss_evicts_a_rarely_used_model_before_a_recently_used_but_frequent_one():
    demand = {"frequent": 9.0, "rare": 1.0}.get
    replicas = [R("a", C("frequent", 1), C("k", 9)), R("b", C("rare", 5), C("k2", 9))]
    assert first(rank("m", replicas, lambda m: demand(m) or 5.0)) == "b"


def test_a_victim_with_requests_running_comes_last():
    replicas = [R("a", C("x", 1, in_flight=2), C("y", 9)), R("b", C("z", 5), C("w", 9))]
    assert flat(rank("m", replicas, no_demand)) == ["b", "a"]


def test_a_model_whose_load_failed_recently_goes_where_it_failed_and_evicts_nothing():
    replicas = [R("a"), R("b", C("x", 1), C("y", 2), backoff={"m"})]
    assert first(rank("m", replicas, no_demand)) == "b"


def test_a_miss_ranks_every_replica_once_and_a_hit_its_holders_once():
    replicas = [R(f"r{i}", C(f"m{i}", i), C(f"n{i}", i + 1), in_flight=i % 3) for i in range(6)]
    replicas.append(R("r6", C("m1", 9), C("x", 9)))
    assert sorted(flat(rank("zzz", replicas, no_demand))) == sorted(r.replica_id for r in replicas)
    assert sorted(flat(rank("m1", replicas, no_demand))) == ["r1", "r6"]
    assert flat(rank("n4", replicas, no_demand)) == ["r4"]


# -- demand -----------------------------------------------------------------------------------------


def test_demand_decays_by_half_each_half_life():
    tracker = DemandTracker(half_life_s=10.0)
    for _ in range(4):
        tracker.add("m", now=100.0)
    assert tracker.demand("m", 100.0) == pytest.approx(4.0)
    assert tracker.demand("m", 110.0) == pytest.approx(2.0)
    tracker.add("m", now=110.0)
    assert tracker.demand("m", 120.0) == pytest.approx(1.5)
    assert tracker.demand("never", 120.0) == 0.0
    assert math.isclose(tracker.demand("m", 1e6), 0.0, abs_tol=1e-12)


def test_demand_does_not_grow_when_the_clock_steps_back_and_forgotten_keys_count_nothing():
    tracker = DemandTracker(half_life_s=10.0)
    tracker.add(("r1", "m"), now=100.0)
    tracker.add(("r2", "m"), now=100.0)
    assert tracker.demand(("r1", "m"), 0.0) == pytest.approx(1.0)
    tracker.keep_only(lambda key: key[0] == "r2")
    assert tracker.demand(("r1", "m"), 100.0) == 0.0
    assert tracker.demand(("r2", "m"), 100.0) == pytest.approx(1.0)


# -- bytes: a memory budget per replica ---------------------------------------------------------------

MB = 1 << 20


def S(model_id, last_used, size, in_flight=0):
    """A copy of ``size`` bytes."""
    return Copy(model_id, last_used, in_flight, 0.0, size)


def B(replica_id, *copies, budget, held_elsewhere=0, in_flight=0):
    """A replica with a memory budget."""
    return Replica(replica_id, tuple(copies), in_flight=in_flight, budget=budget, held_elsewhere=held_elsewhere)


def test_one_large_rarely_used_model_is_evicted_before_two_small_busy_ones():
    """GDSF's point: the set of victims with the least worth that frees the slot and the bytes, not the least
    recent copy."""
    from deployments.routing.policy import eviction

    worth = {"large": 1.0, "small1": 10.0, "small2": 10.0}.__getitem__
    replica = Replica(
        "a",
        (S("large", 9, 300 * MB), S("small1", 1, 50 * MB), S("small2", 2, 50 * MB)),
        slots=3,
        budget=500 * MB,
    )
    victims = eviction(replica, "new", 200 * MB, lambda c: worth(c.model_id))
    assert [v.model_id for v in victims] == ["large"]  # not both small ones, which would free enough too
    victims = eviction(replica, "new", 150 * MB, lambda c: worth(c.model_id))
    assert [v.model_id for v in victims] == ["large"]  # not small1, the least recently used, though it would do
    busy_large = {"large": 30.0, "small1": 10.0, "small2": 10.0}.__getitem__
    victims = eviction(replica, "new", 200 * MB, lambda c: busy_large(c.model_id))
    assert [v.model_id for v in victims] == ["small1", "small2"]  # now the large one is worth more than both


def test_a_copy_fits_as_it_is_needs_a_slot_and_its_bytes():
    from deployments.routing.policy import eviction

    replica = B("a", S("x", 1, 300 * MB), budget=500 * MB)
    assert eviction(replica, "new", 200 * MB, lambda c: 1.0) == ()  # a free slot, and the bytes
    assert [v.model_id for v in eviction(replica, "new", 201 * MB, lambda c: 1.0)] == ["x"]
    assert eviction(replica, "new", 501 * MB, lambda c: 1.0) is None  # larger than the whole budget


def test_a_copy_in_use_frees_its_slot_but_not_its_bytes_and_lingering_copies_count():
    from deployments.routing.policy import eviction

    busy = B("a", S("x", 1, 300 * MB, in_flight=2), budget=500 * MB)
    assert eviction(busy, "new", 300 * MB, lambda c: 1.0) is None  # its bytes stay until its requests end
    lingering = B("b", budget=500 * MB, held_elsewhere=300 * MB)
    assert eviction(lingering, "new", 300 * MB, lambda c: 1.0) is None and lingering.used == 300 * MB


def test_a_miss_goes_where_it_fits_as_it_is_then_where_it_evicts_least_worth_never_where_it_cannot_fit():
    demand = {"big": 1.0, "busy": 50.0, "warm": 5.0}.get
    replicas = [
        B("a", S("busy", 1, 400 * MB), budget=500 * MB),  # one slot free, but not the bytes: evicts busy
        B("b", S("big", 2, 400 * MB), budget=500 * MB),  # the same, evicting big (worth 1)
        B("c", S("warm", 3, 100 * MB), budget=500 * MB),  # a free slot and the bytes
        B("d", budget=100 * MB),  # can never hold it
    ]
    assert flat(rank("new", replicas, lambda m: demand(m) or 0.0, size=300 * MB)) == ["c", "b", "a", "d"]


def test_without_sizes_the_count_alone_decides():
    """A model no replica measured yet (size 0), or replicas without a budget: the rule of the count."""
    replicas = [B("a", S("x", 1, 400 * MB), budget=500 * MB), Replica("b", (C("y", 2), C("z", 3)))]
    assert first(rank("new", replicas, no_demand)) == "a"  # a free slot, and 0 bytes fit


def test_a_hot_models_new_copy_must_fit_where_it_spreads():
    busy = B("a", S("hot", 5, 300 * MB, in_flight=6), budget=500 * MB, in_flight=6)
    no_room = B("b", S("x", 1, 300 * MB, in_flight=1), budget=500 * MB, in_flight=1)
    assert flat(rank("hot", [busy, no_room], lambda m: 10.0, size=300 * MB)) == ["a"]
    room = B("c", S("x", 1, 100 * MB), budget=500 * MB)
    assert flat(rank("hot", [busy, room], lambda m: 10.0, size=300 * MB)) == ["c", "a"]


def test_a_miss_does_not_wait_behind_a_load_under_way_while_another_replica_can_take_it():
    # A replica loads one model at a time: a free slot beside a long load is worth less than an eviction on
    # a replica that loads nothing (and when every replica is loading, the free slot still comes first).
    loading = Copy("big", 1, in_flight=1, loading=True)
    replicas = [R("a", loading), R("b", C("x", 5), C("y", 9))]
    assert flat(rank("m", replicas, no_demand)) == ["b", "a"]
    busy = [R("a", loading), R("b", C("x", 5), Copy("y", 9, loading=True))]
    assert flat(rank("m", busy, no_demand)) == ["a", "b"]
    # A hit still goes to its holder while it loads: the request waits for its own model's load.
    assert flat(rank("big", replicas, no_demand)) == ["a"]
