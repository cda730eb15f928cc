"""The benchmark's report over a series of runs (a target is met only where every run met it), and the in-process
floor timed on what the servers are sent."""

import json

from bench.report import every_run, targets
from bench.run import Report, earlier_runs, keep_run, runs_folder


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


def test_a_target_that_one_run_did_not_measure_is_not_called_met_and_one_missed_anywhere_is_missed():
    overhead = "serving overhead"
    met, missed, unmeasured = run_with_hot_path(10.5), run_with_hot_path(12.0), Report()  # gaps 2.5, 4.0 ms

    def overhead_row(runs):
        ((figures, ok),) = [(figures, ok) for t, figures, ok in every_run(runs) if t.startswith(overhead)]
        return figures, ok

    assert overhead_row([met, unmeasured]) == (["2.5 ms (10.5 against 8.0 ms)", "not measured"], None)
    assert overhead_row([missed, unmeasured]) == (["4.0 ms (12.0 against 8.0 ms)", "not measured"], False)


def _point(rps, sent=400, errors=0):
    return {"rps": rps, "sent": sent, "n": sent - errors, "errors": errors, "p50_ms": 10.0, "cpu_ms_per_request": 0.05}


def test_a_figure_resting_on_requests_not_answered_misses_its_target_whatever_it_comes_to():
    """The app's failures leave the answered requests' figures (faster, or a rate of few), and the peer's
    failures lower its rate, lifting the app's ratio: neither may meet a target."""
    failing_app = Report(hot={"direct": {"p50_ms": 8.0}, "seed": _point(0, 200), "app": _point(0, 200, errors=150)})
    rows = {t: (m, ok) for t, m, ok in targets(failing_app)}
    hot = next(t for t in rows if t.startswith("hot-path p50"))
    assert rows[hot] == ("1.00x (10.0 against 10.0 ms); 150 requests unanswered", False)
    one = {"one model": {16: _point(300.0), 64: _point(0.0, errors=400)}}
    two = {"two hot models": {16: _point(300.0), 64: _point(330.0)}}
    seed = {"one model": {16: _point(0.0, errors=400)}, "two hot models": {16: _point(100.0)}}
    r = Report(throughput={"app": {**one, **two}, "seed": seed})
    rows = {t: (m, ok) for t, m, ok in targets(r)}
    (overload,) = [row for t, row in rows.items() if t.startswith("throughput at 64 clients")]
    assert overload[1] is False and overload[0].endswith("; 400 requests unanswered")
    one_hot = next(row for t, row in rows.items() if t.startswith("one hot model"))
    two_hot = next(row for t, row in rows.items() if t.startswith("two hot models"))
    assert one_hot == ("no ratio (300.0 against 0.0 req/s); 400 requests unanswered", False)
    assert two_hot == ("3.00x (300.0 against 100.0 req/s)", True)


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


def test_the_in_process_floor_times_the_sentences_a_servers_round_is_sent_in_its_order():
    """The serving overhead is the app's p50 less the floor's: both over the same inputs (a round of the hot
    path sends the four sentences in turn), or the difference of the sentences is counted as overhead."""
    import json

    from bench.peers import Direct
    from bench.scenarios import TEXT, predict_request
    from deployments.worker.threads import IdleThreadsRule

    seen: list[str] = []
    direct = Direct.__new__(Direct)  # its model loaded: a stand-in runtime that notes what it is asked
    direct.model, direct.idle_threads, direct.rule = "sentiment", 1, IdleThreadsRule()
    direct.runtime = type("Runtime", (), {"predict": lambda self, texts: seen.extend(texts) or [[("pos", 1.0)]]})()
    run = direct.round(8)
    sent = [json.loads(predict_request("sentiment", {}, i).body)["input_data"] for i in range(8)]
    assert seen == sent == TEXT * 2 and len(set(TEXT)) == 4 and run.sent == len(run.latencies) == 8


def test_a_series_judges_its_own_runs_only_and_a_rendered_run_is_not_counted_twice(tmp_path, monkeypatch):
    """A new series (``make bench``: 3 runs) starts from none of the runs an earlier series kept, finished or
    aborted; ``--render`` of the last run's benchmarks.json gives it once, beside the series' others."""
    stamps = iter(f"2026010{i}-000000" for i in range(1, 10))
    monkeypatch.setattr("bench.run.time.strftime", lambda *_: next(stamps))
    old = [run_with_hot_path(app_ms) for app_ms in (11.0, 12.0)]  # a series aborted after its second run
    assert keep_run(old[0], tmp_path, 3, first=True) == []
    assert keep_run(old[1], tmp_path, 3, first=True) == []  # ... then started again
    assert keep_run(old[0], tmp_path, 3, first=False) == [old[1]]
    new = [run_with_hot_path(app_ms) for app_ms in (13.0, 14.0, 15.0)]
    assert keep_run(new[0], tmp_path, 3, first=True) == []
    assert keep_run(new[1], tmp_path, 3, first=False) == [new[0]]
    assert keep_run(new[2], tmp_path, 3, first=False) == new[:2]
    assert len(list(runs_folder(tmp_path).glob("run-*.json"))) == 3
    assert keep_run(run_with_hot_path(16.0), tmp_path, 3, first=False) == new[1:]  # a fourth: the oldest goes

    rendered = tmp_path / "benchmarks.json"
    rendered.write_text(json.dumps(new[2].__dict__, indent=1, default=str))
    assert earlier_runs(tmp_path, rendered) == [new[1], run_with_hot_path(16.0)]
