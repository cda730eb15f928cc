"""The benchmark's report over a series of runs: a target is met only where every run met it."""

from bench.report import every_run, targets
from bench.run import Report


def run_with_hot_path(app_ms: float, seed_ms: float = 10.0, direct_ms: float = 8.0) -> Report:
    return Report(hot={"direct": {"p50_ms": direct_ms}, "seed": {"p50_ms": seed_ms}, "app": {"p50_ms": app_ms}})


def test_a_target_met_in_every_run_is_met_and_one_missed_in_any_run_is_not():
    met, missed = run_with_hot_path(12.0), run_with_hot_path(14.0)  # 1.2x and 1.4x the seed-style server's
    rows = {target: (figures, ok) for target, figures, ok in every_run([met, missed, met])}
    hot = next(t for t, _, _ in targets(met) if t.startswith("hot-path p50"))
    assert rows[hot] == (
        ["1.20x (12.0 against 10.0 ms)", "1.40x (14.0 against 10.0 ms)", "1.20x (12.0 against 10.0 ms)"],
        False,
    )
    assert {t: ok for t, _, ok in every_run([met, met])}[hot] is True


def test_a_target_that_one_run_did_not_measure_is_not_called_met():
    overhead = "serving overhead"
    measured, unmeasured = run_with_hot_path(12.0), Report()  # the second run measured no hot path
    rows = {t: (figures, ok) for t, figures, ok in every_run([measured, unmeasured]) if t.startswith(overhead)}
    ((figures, ok),) = rows.values()
    assert figures == ["4.0 ms (12.0 against 8.0 ms)", "not measured"] and ok is None
