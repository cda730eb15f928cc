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


def test_the_hot_paths_breakdown_splits_each_servers_mean_into_parts_that_add_up_to_it():
    from bench.report import _analysis, _breakdown
    from bench.scenarios import Run, hot_breakdown

    app, seed = Run(latencies=[0.010, 0.012]), Run(latencies=[0.007, 0.009])  # means 11 and 8 ms
    app_counted = {"requests": 2, "batches": 2, "predict_seconds": 0.016, "model_seconds": 0.014}
    b = hot_breakdown(app, seed, app_counted, {"model_calls": 2, "model_seconds": 0.0136})
    assert b["app"] == {
        "requests": 2,
        "counted": 2,
        "batches": 2,
        "end_to_end_ms": 11.0,
        "model_ms": 7.0,
        "worker_own_ms": 1.0,
        "outside_worker_ms": 3.0,
    }
    assert b["seed"]["model_ms"] + b["seed"]["outside_model_ms"] == b["seed"]["end_to_end_ms"] == 8.0
    report = Report(breakdown=b)
    table = "\n".join(_breakdown(report))
    assert "| end to end, as the client sees it | 11.0 | 8.0 |" in table
    assert "| the model's call: forward pass and encoding the answer | 7.0 | 6.8 |" in table
    (analysis,) = [line for line in _analysis(report) if "by part" in line]
    assert "3.0 ms in all" in analysis and "+0.2 ms (7.0 against 6.8)" in analysis and "+1.0 ms" in analysis
    assert _breakdown(Report()) == []  # a run from before the breakdown renders without it
    report.overhead = {
        "floor: GET /floor/healthz (Serve alone)": {"p50_ms": 0.4, "mean_ms": 0.5},
        "floor hop: POST /floor/hop (Serve alone)": {"p50_ms": 1.9, "mean_ms": 2.4},
    }
    (floor,) = [line for line in _analysis(report) if "floor here" in line]
    assert "0.5 ms" in floor and "2.4 ms" in floor and "+0.6 ms over Serve's" in floor and "1.0 ms more" in floor
