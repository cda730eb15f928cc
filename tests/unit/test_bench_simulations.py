"""The cache simulations the benchmark compares the app with."""

import random

from bench.scenarios import Run
from bench.simulate import belady_misses, lru_misses, zipf_trace


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


def test_zipf_trace_is_skewed_towards_the_first_items():
    trace = zipf_trace(8, 4000, s=1.0, seed=1)
    counts = [trace.count(k) for k in range(8)]
    assert counts == sorted(counts, reverse=True) or counts[0] > 2 * counts[7]
    assert counts[0] / len(trace) > 0.3


def test_run_percentiles_and_rate():
    run = Run(latencies=[i / 1000 for i in range(1, 101)], elapsed=2.0)
    assert run.pct(50) == 0.051 and run.pct(99) == 0.1
    assert run.rps == 50
