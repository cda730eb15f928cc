"""A task of the tests' own whose output kind fails as a task module's own code may: its ``encode`` (in the
worker replica) raises on a text as long as ``ENCODE_FAILS``, its ``native`` (in the ingress) on one as long as
``NATIVE_FAILS``; on a text as long as ``NUMPY_NATIVE`` its ``native`` answers numpy numbers, which JSON does not
hold, and on one as long as ``FLOAT_COUNTS`` its ``encode`` gives floats where its v2 metadata declares INT64.
Otherwise it answers as ``text-statistics`` does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from serve_app.core.inputs import TEXT
from serve_app.core.outputs import Wire
from serve_app.core.tasks import Task
from tests.text_stats_task import CountingRuntime, Counts

ENCODE_FAILS = "fails in encode, in the worker"
NATIVE_FAILS = "fails in native"
NUMPY_NATIVE = "answers numpy numbers, natively"
FLOAT_COUNTS = "encodes its counts as floats"


class FaultyCounts(Counts):
    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        if any(row["chars"] == len(ENCODE_FAILS) for row in rows):
            return {}["chars"]  # a KeyError, as a bug in a task's code raises one
        if any(row["chars"] == len(FLOAT_COUNTS) for row in rows):
            return {k: np.array([float(r[k]) for r in rows]) for k in ("chars", "words")}  # FP64, not INT64
        return super().encode(rows)

    def native(self, wire: Wire, count: int) -> list[Any]:
        chars = wire["chars"].tolist()
        if len(NATIVE_FAILS) in chars:
            raise RuntimeError("no native form for this answer")
        if len(NUMPY_NATIVE) in chars:  # the arrays' own items: numpy numbers
            return [{"chars": c, "words": w} for c, w in zip(wire["chars"], wire["words"], strict=True)]
        return super().native(wire, count)


class FaultyRuntime(CountingRuntime):
    task = "faulty-statistics"


TASK = Task(
    name="faulty-statistics",
    input=TEXT,
    output=FaultyCounts(),
    runtimes=(FaultyRuntime,),
    description="characters and words of a text, failing on two lengths of text",
    platform="python",
)
