"""A task of the tests' own, outside the app's packages: ``text-statistics``, the characters and words of
each text. It is one module, as every task is: its input kind (text), an output kind of its own, its
runtime. The integration tests add it to an app's ``tasks`` and serve it over every protocol, which shows
that a new task needs no edit anywhere else."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deployments.runtimes import ModelRuntime
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import ContractError, OutputKind, Wire
from serve_app.core.tasks import Task
from serve_app.core.tensors import TensorSpec


class Counts(OutputKind):
    """A row is ``{"chars": int, "words": int}``; v2: ``chars`` and ``words``, INT64 ``[inputs]``."""

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("chars", "INT64", (-1,)), TensorSpec("words", "INT64", (-1,))]

    def encode(self, rows: Sequence[Any]) -> dict[str, np.ndarray]:
        try:
            return {k: np.array([int(r[k]) for r in rows], dtype=np.int64) for k in ("chars", "words")}
        except (KeyError, TypeError, ValueError) as e:
            raise ContractError(f"a text-statistics row is {{'chars': int, 'words': int}}: {e}") from None

    def native(self, wire: Wire, count: int) -> list[Any]:
        return [{"chars": c, "words": w} for c, w in zip(wire["chars"].tolist(), wire["words"].tolist(), strict=True)]


class CountingRuntime(ModelRuntime):
    task = "text-statistics"

    def load(self) -> None:
        self.separator = self.spec.parameters.get("separator")  # None: any whitespace

    def predict(self, inputs: list[str]) -> list[dict[str, int]]:
        return [{"chars": len(text), "words": len(text.split(self.separator))} for text in inputs]


TASK = Task(
    name="text-statistics",
    input=TEXT,
    output=Counts(),
    runtimes=(CountingRuntime,),
    description="characters and words of a text",
    platform="python",
)
