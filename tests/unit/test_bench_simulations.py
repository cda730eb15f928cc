"""The cache simulations the benchmark compares the app with: the count-only caches, and the byte
accounting of the simulator with model sizes (the pool replaying traces through the router's own policy,
and the global byte-LRU and GDSF peers)."""

import math
import random

import pytest

from bench.scenarios import Run
from bench.simulate import (
    MB,
    WORKLOADS,
    belady_misses,
    byte_lru,
    gdsf,
    lru_misses,
    model_sizes,
    pool_misses,
    pool_run,
    sized_peers,
    sized_pool_report,
    zipf_trace,
)


def test_lru_and_belady_on_a_worked_example():
    trace = [0, 1, 2, 0, 1, 3, 0, 3, 1, 2]
    # LRU, 2 slots: only the second request for 3 hits.
    assert lru_misses(trace, 2) == 9
    # Belady keeps what is needed soonest: 0 at t=3 and t=6, 3 at t=7 hit.
    assert belady_misses(trace, 2) == 7


def test_belady_never_misses_more_than_lru_and_both_need_one_miss_per_distinct_item():
    rng = random.Random(0)
    for _ in range(50):
        trace = [rng.randrange(6) for _ in range(80)]
        for slots in (1, 2, 4):
            opt, lru = belady_misses(trace, slots), lru_misses(trace, slots)
            assert len(set(trace)) <= opt <= lru <= len(trace)
        assert lru_misses(trace, 6) == belady_misses(trace, 6) == len(set(trace))


@pytest.mark.parametrize("s", [0.8, 1.0, 1.2])
def test_zipf_trace_follows_zipfs_law(s):
    """Each model's share is its Zipf frequency, 1 / rank^s normalised, within four standard deviations of
    a binomial count, and the counts fall with the rank."""
    n = 4000
    trace = zipf_trace(8, n, s=s, seed=1)
    counts = [trace.count(k) for k in range(8)]
    weights = [1 / (k + 1) ** s for k in range(8)]
    for k, count in enumerate(counts):
        p = weights[k] / sum(weights)
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (k, count, n * p)
    assert counts[0] > counts[1] > counts[3] > counts[7]
    assert counts[0] > 2 * counts[7]


def test_run_percentiles_are_by_nearest_rank_and_its_rate_is_requests_over_time():
    run = Run(latencies=[i / 1000 for i in range(1, 101)], elapsed=2.0)
    assert run.pct(50) == 0.05 and run.pct(99) == 0.099 and run.pct(100) == 0.1
    assert Run(latencies=[4, 1, 3, 2]).pct(50) == 2 and Run(latencies=list(range(1, 201))).pct(99) == 198
    assert Run(latencies=[5]).pct(1) == 5 and math.isnan(Run().pct(50))
    assert run.rps == 50


# -- model sizes --------------------------------------------------------------------------------------------


def test_model_sizes_are_heavy_tailed_between_their_bounds():
    sizes = model_sizes(1000, seed=1, low=20 * MB, high=2000 * MB)
    assert sizes == model_sizes(1000, seed=1, low=20 * MB, high=2000 * MB)  # a seed, a fleet
    assert min(sizes) == 20 * MB and max(sizes) == 2000 * MB  # clipped to the bounds, and reaching both
    ordered = sorted(sizes)
    median = ordered[500]
    assert 170 * MB < median < 235 * MB  # the geometric mean of the bounds: 200 MB
    assert sum(sizes) / len(sizes) > 1.2 * median  # a long right tail: the mean well above the median
    assert ordered[990] > 5 * median  # the largest 1 % are more than 5 times the median


# -- one global cache with sizes: worked examples ---------------------------------------------------------------


def test_byte_lru_evicts_the_least_recent_until_the_count_and_the_bytes_fit():
    sizes = [50, 30, 20, 60]
    run = byte_lru([0, 1, 2, 0, 3, 1, 2], sizes, capacity=100, max_copies=3)
    # 0, 1, 2 load (100 bytes, 3 models); 0 hits; 3 (60) evicts 1 for the count, then 2 and 0 for the bytes;
    # 1 loads beside 3 (90); 2 evicts 3 (the least recent) for the bytes.
    assert (run.requests, run.hits) == (7, 1)
    assert run.requested_bytes == 50 + 30 + 20 + 50 + 60 + 30 + 20
    assert run.loaded_bytes == 260 - 50
    assert run.hit_ratio == 1 / 7
    assert run.byte_hit_ratio == pytest.approx(50 / 260)
    assert run.bytes_per_1000 == pytest.approx(1000 * 210 / 7)
    assert run.peak_bytes == [100] and run.peak_copies == [3]


def test_gdsf_keeps_small_busy_models_before_a_large_rare_one_and_ages_what_stays():
    sizes = [80 * MB, 10 * MB, 10 * MB, 10 * MB]
    trace = [0, 1, 2, 1, 2, 3, 0, 1]
    # GDSF: 3 evicts 0 (priority 1/80 against 2/10 for 1 and 2); 0 then evicts 3 (L + 1/10 < 2/10, with
    # L = 1/80), so 1 hits at the end. LRU evicts 0 for 3, then 1 (the least recent) for 0, and misses 1.
    run = gdsf(trace, sizes, capacity=100 * MB, max_copies=4)
    assert (run.hits, run.loaded_bytes) == (3, sum(sizes[m] for m in (0, 1, 2, 3, 0)))
    lru = byte_lru(trace, sizes, capacity=100 * MB, max_copies=4)
    assert (lru.hits, lru.loaded_bytes) == (2, sum(sizes[m] for m in (0, 1, 2, 3, 0, 1)))
    # Aging: a model loaded once, long ago, does not stay for ever against newer ones with one request.
    # 1 (3 requests: priority 3/10) against models of one request each (L + 1/10): L grows with each eviction
    # (0.1, 0.1, 0.2, 0.2) until a newcomer ties 1, and 1, the less recent, goes; without aging it would stay.
    aged = gdsf([1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 1], [10 * MB] * 9, capacity=30 * MB, max_copies=3)
    assert aged.hits == 2


def test_global_caches_without_a_byte_limit_are_the_count_lru():
    rng = random.Random(3)
    for _ in range(30):
        trace = [rng.randrange(12) for _ in range(120)]
        sizes = [rng.randrange(1, 50) * MB for _ in range(12)]
        for slots in (1, 3, 6):
            run = byte_lru(trace, sizes, capacity=sum(sizes), max_copies=slots)
            assert run.requests - run.hits == lru_misses(trace, slots)


# -- the pool, replaying the router's own policy -----------------------------------------------------------


def test_the_pool_applies_the_routers_victims_under_a_budget():
    """One replica of 2 slots and 100 bytes: A (60, asked twice) and B (30, asked five times) fill it; C (35)
    needs one of them out. Ray's LRU would take B, the least recent; the router names A, worth less (its
    demand) although used last, and the replica evicts it, so the next B hits."""
    a, b, c = 0, 1, 2
    sizes = [60, 30, 35]
    trace = [a, b, b, b, b, b, a, c, b]
    run = pool_run(trace, 1, 2, sizes, budget=100)
    assert (run.hits, run.router_evictions, run.lru_evictions) == (6, 1, 0)
    assert run.loaded_bytes == 60 + 30 + 35
    lru = pool_run(trace, 1, 2, sizes, budget=100, policy="ray-default")  # no victims named: LRU by count
    assert (lru.hits, lru.router_evictions, lru.lru_evictions) == (5, 0, 2)
    assert lru.loaded_bytes == 60 + 30 + 35 + 30


def test_the_pool_places_a_miss_where_its_bytes_fit():
    """Two replicas of 100 bytes: A (60) on one, B (30) on the other. D (50) fits beside B as it is, and not
    beside A: the router, told D's size, places it beside B and evicts nothing, so A hits next. (Placed by
    count alone, D would go to the first replica with a free slot, and A would go.)"""
    a, b, d = 0, 1, 2
    run = pool_run([a, b, d, a], 2, 2, [60, 30, 50], budget=100)
    assert (run.hits, run.router_evictions, run.lru_evictions) == (1, 0, 0)
    assert sorted(run.peak_bytes) == [60, 80]


def test_pool_replicas_keep_within_their_budget_and_their_cap():
    rng = random.Random(5)
    sizes = model_sizes(60, seed=2, low=5 * MB, high=100 * MB)
    for policy in ("model-aware", "ray-default"):
        for budget in (100 * MB, 125 * MB, 150 * MB):
            trace = [rng.randrange(60) for _ in range(600)]
            assert max(pool_run(trace, 4, 2, sizes, None, policy=policy).peak_bytes) > budget  # it binds
            run = pool_run(trace, 4, 2, sizes, budget, policy=policy)
            assert max(run.peak_bytes) <= budget and max(run.peak_copies) <= 2, (policy, budget)
            if policy == "model-aware":  # the router's victims always make room: the replica adds none of its own
                assert run.lru_evictions == 0 and run.router_evictions > 0, budget


def test_a_pool_without_a_budget_places_as_it_does_by_count():
    """Without a budget, sizes change nothing but the bytes counted: the hits are those of the pool by count
    (pool_misses, the simulation of the count-only app) and each miss loads its model's bytes."""
    sizes = model_sizes(200, seed=4)
    for name, make in WORKLOADS.items():
        trace = make(200, 2000)
        for policy in ("model-aware", "ray-default"):
            run = pool_run(trace, 8, 2, sizes, budget=None, policy=policy)
            assert run.requests - run.hits == pool_misses(trace, 8, 2, policy), (name, policy)
            assert run.requested_bytes == sum(sizes[m] for m in trace)
            assert run.router_evictions == 0  # Ray's LRU takes the victim: nothing to name


def test_a_model_larger_than_a_budget_is_refused_by_the_simulation():
    with pytest.raises(ValueError, match="never fits"):
        pool_run([0, 1], 2, 2, [10, 200], budget=100)
    with pytest.raises(ValueError, match="never fits"):
        byte_lru([0, 1], [10, 200], capacity=100, max_copies=2)


def assert_consistent(result: dict, trace: list[int], sizes: list[int], where: str = "") -> None:
    """Every policy's figures as their definitions imply: ratios within [0, 1]; the bytes loaded those of the
    misses, within the compulsory bound; no policy above Belady's count-only optimum."""
    requested = sum(sizes[m] for m in trace)
    bound, compulsory = result["Belady (count)"]["hit_ratio"], result["compulsory"]
    assert 0 <= bound <= compulsory["hit_ratio"] <= 1, where
    for policy, v in result.items():
        if policy in ("Belady (count)", "compulsory", "total"):
            continue
        at = f"{where} {policy}"
        assert v["requests"] == len(trace) and v["requested_bytes"] == requested, at
        assert 0 <= v["hit_ratio"] <= bound, at
        assert 0 <= v["byte_hit_ratio"] <= compulsory["byte_hit_ratio"] <= 1, at
        assert v["loaded_bytes"] == pytest.approx((1 - v["byte_hit_ratio"]) * requested), at
        assert v["bytes_per_1000"] == pytest.approx(1000 * v["loaded_bytes"] / len(trace)), at
        assert v["hits"] == round(v["hit_ratio"] * len(trace)), at


def test_sized_peers_are_consistent_on_random_traces():
    rng = random.Random(7)
    for _ in range(20):
        sizes = model_sizes(30, seed=rng.randrange(100), low=1 * MB, high=80 * MB)
        trace = zipf_trace(30, 300, s=rng.choice([0.8, 1.0, 1.2]), seed=rng.randrange(100))
        for budget in (80 * MB, 120 * MB, None):
            result = sized_peers(trace, sizes, 3, 2, budget)
            assert_consistent(result, trace, sizes, f"budget {budget}")
            # the global peers: the pool's bytes (without a budget, every model of the trace at once), its count cap
            assert result["total"] == {
                "bytes": 3 * budget if budget else sum(sizes[m] for m in set(trace)),
                "copies": 6,
            }


def test_sized_pool_report_covers_every_workload_consistently():
    report = sized_pool_report(40, 4, 2, 400)
    assert list(report["workloads"]) == list(WORKLOADS)
    sizes = model_sizes(40, seed=1)
    assert report["sizes"]["max"] == max(sizes) <= report["budget_bytes"]
    for name, result in report["workloads"].items():
        assert_consistent(result, WORKLOADS[name](40, 400), sizes, name)


def test_each_models_slowest_requests_are_its_misses():
    """One client's trace: latencies in trace order; of each model's requests, as many as its loads, the slowest
    are its misses, even where another model's hits are slower than them."""
    from bench.scenarios import split_misses

    trace = [0, 1, 0, 0, 1, 1, 2]
    latencies = [0.30, 0.90, 0.02, 0.03, 0.50, 0.40, 0.05]  # model 1's hits (0.5, 0.4) are slower than 0's miss
    hits, misses, gaps = split_misses(trace, ["a", "b", "c"], latencies, {"a": 1, "b": 1, "c": 1})
    assert misses == [0.05, 0.30, 0.90] and hits == [0.02, 0.03, 0.40, 0.50]
    assert gaps == pytest.approx([0.30 - 0.03, 0.90 - 0.50])  # c, requested once, has no gap
    with pytest.raises(ValueError):
        split_misses(trace, ["a", "b", "c"], latencies[:-1], {"a": 1})
