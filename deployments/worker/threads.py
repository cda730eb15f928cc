"""Whether a lone request's forward pass runs on its node's idle threads: decided by measuring, per model copy.

The router offers a request the node's idle threads when no worker replica of the node is busy
(``RouteHint.threads``). Whether they help depends on the model and the machine: a second thread takes a
fifth or more off a small text model's pass on one machine and adds to it on a slower, shared one
(docs/performance.md has the figures). A copy's ``IdleThreadsRule`` therefore
times its lone batches both ways and runs them on the idle threads only while that is measured faster:

* **Trials.** The first ``TRIALS`` offers of each kind alternate, idle threads first.
* **Then the faster.** The idle threads while their median time per input over the last ``WINDOW`` lone
  batches is under ``GAIN`` times the own share's; the own share otherwise.
* **Still measuring.** Every ``RETRY_EVERY``-th offer (counted from the first) takes the other way, so that
  the choice follows the machine when it changes (another model loaded beside it, a neighbour on a shared
  host). It follows faster from the idle threads to the own share (the way in use fills its window with its
  new times) than back (the other way gets one time in ``RETRY_EVERY``: about half a window of them turns it).

Medians, not means: the first pass of a copy, and a pass that a neighbouring process interrupted, are
outliers that a mean would carry for a long time. Times are per input: a lone request of several inputs
counts as much as one of one, which suits a model whose requests are alike in size.

The rule is pure (no clock, no torch): the batcher asks ``use`` before a lone batch that was offered idle
threads and tells ``record`` what that batch took, both on the replica's event loop; ``report`` may run on
Serve's polling thread, hence the lock.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

from serve_app.core.schemas import IdleThreadsReport

TRIALS = 3
"""Lone batches of each kind, in turns, before the rule compares them."""
WINDOW = 15
"""The newest lone batches of each kind whose median time per input is compared."""
GAIN = 0.95
"""The idle threads are used while their median is under this share of the own threads' (5 % faster at least)."""
RETRY_EVERY = 10
"""After the trials, one offer in this many takes the way not chosen, to measure it again."""


class IdleThreadsRule:
    """One model copy's choice, for its lone batches offered the node's idle threads, of running on them."""

    def __init__(self) -> None:
        self._seconds: dict[bool, deque[float]] = {True: deque(maxlen=WINDOW), False: deque(maxlen=WINDOW)}
        self._offers = 0
        self._measured = {True: 0, False: 0}  # lone batches measured on each way, all told
        self._lock = threading.Lock()

    def faster_on_idle(self) -> bool | None:
        """Whether the idle threads are measured faster; None until each kind has had its trials."""
        with self._lock:
            return self._faster_on_idle()

    def _faster_on_idle(self) -> bool | None:
        idle, own = self._seconds[True], self._seconds[False]
        if len(idle) < TRIALS or len(own) < TRIALS:
            return None
        return statistics.median(idle) < GAIN * statistics.median(own)

    def use(self) -> bool:
        """Whether this offer runs on the idle threads (a lone batch about to run)."""
        with self._lock:
            self._offers += 1
            faster = self._faster_on_idle()
            if faster is None:  # trials: the kind with fewer measures, the idle threads first
                return len(self._seconds[True]) <= len(self._seconds[False])
            return (not faster) if self._offers % RETRY_EVERY == 0 else faster

    def record(self, on_idle: bool, seconds_per_input: float) -> None:
        """What a lone batch offered the idle threads took, per input, on them (``on_idle``) or not."""
        with self._lock:
            self._seconds[on_idle].append(seconds_per_input)
            self._measured[on_idle] += 1

    def report(self) -> IdleThreadsReport:
        with self._lock:
            idle, own = self._seconds[True], self._seconds[False]
            return IdleThreadsReport(
                lone_batches=self._measured[True] + self._measured[False],
                on_idle_threads=self._measured[True],
                idle_threads_ms=round(1000 * statistics.median(idle), 3) if idle else None,
                own_threads_ms=round(1000 * statistics.median(own), 3) if own else None,
                uses_idle_threads=self._faster_on_idle(),
            )
