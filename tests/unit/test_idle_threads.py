"""A copy's rule for running its lone requests on the node's idle threads: trials both ways, then the way
measured faster, measured again now and then (deployments/worker/threads.py)."""

from __future__ import annotations

from deployments.worker.threads import GAIN, RETRY_EVERY, TRIALS, WINDOW, IdleThreadsRule


def run(rule: IdleThreadsRule, n: int, idle_s: float, own_s: float) -> list[bool]:
    """``n`` offers, each recorded as taking ``idle_s`` on the idle threads or ``own_s`` on its own: the choices."""
    choices = []
    for _ in range(n):
        on_idle = rule.use()
        rule.record(on_idle, idle_s if on_idle else own_s)
        choices.append(on_idle)
    return choices


def test_the_trials_alternate_starting_on_the_idle_threads():
    rule = IdleThreadsRule()
    assert run(rule, 2 * TRIALS, 0.010, 0.010) == [True, False] * TRIALS
    assert (rule.report().lone_batches, rule.report().on_idle_threads) == (2 * TRIALS, TRIALS)


def test_after_the_trials_the_idle_threads_are_used_only_where_they_were_faster():
    faster = IdleThreadsRule()
    run(faster, 2 * TRIALS, 0.006, 0.010)
    assert run(faster, RETRY_EVERY - 2 * TRIALS - 1, 0.006, 0.010) == [True] * (RETRY_EVERY - 2 * TRIALS - 1)
    slower = IdleThreadsRule()
    run(slower, 2 * TRIALS, 0.012, 0.010)
    assert run(slower, RETRY_EVERY - 2 * TRIALS - 1, 0.012, 0.010) == [False] * (RETRY_EVERY - 2 * TRIALS - 1)
    report = slower.report()
    assert (report.uses_idle_threads, report.idle_threads_ms, report.own_threads_ms) == (False, 12.0, 10.0)


def test_a_gain_within_the_margin_is_not_worth_the_idle_threads():
    rule = IdleThreadsRule()
    run(rule, 2 * TRIALS, 0.010 * (GAIN + 0.01), 0.010)
    assert rule.faster_on_idle() is False
    assert rule.use() is False


def test_every_so_often_the_way_not_chosen_is_measured_again():
    rule = IdleThreadsRule()
    choices = run(rule, 3 * RETRY_EVERY, 0.006, 0.010)
    assert [i + 1 for i, c in enumerate(choices) if not c][TRIALS:] == [RETRY_EVERY, 2 * RETRY_EVERY, 3 * RETRY_EVERY]


def test_the_choice_follows_the_machine_when_the_idle_threads_stop_paying():
    """Medians of the newest WINDOW: once the idle threads turn slow, the retries of the own share and the
    idle batches' own new times turn the choice within a window's worth of offers."""
    rule = IdleThreadsRule()
    before = 2 * TRIALS + RETRY_EVERY
    run(rule, before, 0.006, 0.010)
    assert rule.faster_on_idle() is True
    choices = run(rule, 2 * WINDOW, 0.020, 0.010)
    assert rule.faster_on_idle() is False
    chosen = [c for i, c in enumerate(choices) if (before + i + 1) % RETRY_EVERY]  # the retries aside
    turned = chosen.index(False)
    assert turned <= WINDOW // 2 + 1 and not any(chosen[turned:])


def test_one_slow_pass_does_not_turn_the_choice():
    """A median: the first pass of a copy, or one a neighbour interrupted, is an outlier, not a verdict."""
    rule = IdleThreadsRule()
    rule.record(True, 0.200)  # a cold first pass on the idle threads
    run(rule, 2 * TRIALS, 0.006, 0.010)
    assert rule.faster_on_idle() is True


def test_the_report_before_any_measure_says_nothing_yet():
    r = IdleThreadsRule().report()
    assert (r.lone_batches, r.on_idle_threads, r.idle_threads_ms, r.own_threads_ms, r.uses_idle_threads) == (
        0,
        0,
        None,
        None,
        None,
    )
