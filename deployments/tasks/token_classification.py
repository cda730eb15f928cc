"""``token-classification`` (named entities, PII): texts in, the labelled spans of each out.

The runtime runs transformers' token-classification pipeline with ``aggregation_strategy="simple"``
(tokens of one entity merged into one span; ``start`` and ``end`` index the input text), a batch in as
few forward passes as the tokenizer allows. Registry ``parameters`` may name another strategy:
``{"aggregation_strategy": "first" | "average" | "max" | "simple"}``.
"""

from __future__ import annotations

from typing import Any

from deployments.runtimes.transformers import PipelineRuntime
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import ENTITIES
from serve_app.core.tasks import Task

STRATEGIES = ("simple", "first", "average", "max")


class TokenClassificationRuntime(PipelineRuntime):
    task = "token-classification"
    pipeline_task = "token-classification"

    def pipeline_kwargs(self) -> dict[str, Any]:
        strategy = self.spec.parameters.get("aggregation_strategy", "simple")
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation_strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        return {"aggregation_strategy": strategy}

    def predict(self, inputs: list[str]) -> list[list[dict[str, Any]]]:
        return self.run_pipeline(inputs)


TASK = Task(
    name="token-classification",
    input=TEXT,
    output=ENTITIES,
    runtimes=(TokenClassificationRuntime,),
    description="labelled spans of a text: named entities (people, places, organisations), PII",
)
