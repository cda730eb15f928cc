"""``token-classification`` (named entities, PII): texts in, the labelled spans of each out.

The runtime runs transformers' token-classification pipeline with ``aggregation_strategy="simple"``
(tokens of one entity merged into one span; ``start`` and ``end`` index the input text), a batch in as
few forward passes as the tokenizer allows. A text longer than the model takes is truncated, as the
pipeline truncates it, and the entities past the cut are not found; with ``stride`` (a number of tokens,
at most half the model's length) the pipeline reads the whole text instead, in windows of the model's
length that overlap by ``stride`` tokens, one forward pass a window (a text of ``max_text_chars`` can take
tens of them). Registry
``parameters``: ``{"aggregation_strategy": "first" | "average" | "max" | "simple", "stride": 128}``. A
request may choose its own ``aggregation_strategy`` (``TokenParameters``), in place of the entry's.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from deployments.runtimes.transformers import PipelineRuntime
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import ENTITIES
from serve_app.core.tasks import Task

Strategy = Literal["simple", "first", "average", "max"]
STRATEGIES = get_args(Strategy)


class TokenClassificationRuntime(PipelineRuntime):
    task = "token-classification"
    pipeline_task = "token-classification"
    model_class = "AutoModelForTokenClassification"

    def pipeline_kwargs(self) -> dict[str, Any]:
        strategy = self.spec.parameters.get("aggregation_strategy", "simple")
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation_strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        stride = self.spec.parameters.get("stride")
        if stride is not None and (type(stride) is not int or stride < 0):
            raise ValueError(f"stride {stride!r}: a number of tokens, 0 or more")
        return {"aggregation_strategy": strategy, **({"stride": stride} if stride is not None else {})}

    def load(self) -> None:
        super().load()
        # The model's length less its two special tokens; windows overlap by at most half of it, so that a text
        # of max_text_chars takes at most about twice the passes it would take without overlap.
        stride, room = self.spec.parameters.get("stride"), self.pipeline.tokenizer.model_max_length - 2
        if stride is not None and stride > room // 2:
            self.pipeline = None
            raise ValueError(
                f"stride {stride}: at most {room // 2}, half the {room} tokens of text the model takes at once"
            )

    def predict(self, inputs: list[str], aggregation_strategy: str | None = None) -> list[list[dict[str, Any]]]:
        """``aggregation_strategy``: a request's, in place of the entry's."""
        return self.run_pipeline(
            inputs, **({"aggregation_strategy": aggregation_strategy} if aggregation_strategy else {})
        )


class TokenParameters(BaseModel):
    """What a request for entities may choose."""

    model_config = ConfigDict(extra="forbid")

    aggregation_strategy: Strategy | None = Field(
        None,
        description="how the tokens of a word and of an entity are merged (transformers' pipeline's strategies), "
        "in place of the registry entry's: 'first', 'average' or 'max' label a word by its first token, the "
        "average of its tokens' scores, or its best token, never splitting it",
    )


TASK = Task(
    name="token-classification",
    input=TEXT,
    output=ENTITIES,
    runtimes=(TokenClassificationRuntime,),
    parameters=TokenParameters,
    description="labelled spans of a text: named entities (people, places, organisations), PII",
)
