"""``token-classification`` (named entities, PII): texts in, the labelled spans of each out.

The runtime answers as transformers' token-classification pipeline answers with
``aggregation_strategy="simple"`` (tokens of one entity merged into one span; ``start`` and ``end`` index the
input text), a batch in as few forward passes as the tokenizer allows. That strategy, the default, it
computes itself (``simple_entities``: the pipeline's steps without its bookkeeping, which took about half a
millisecond a text; docs/performance.md); the others, and a stride, go through the pipeline. A model whose
tokenizer is not a fast one (a Python tokenizer) is refused at load: it gives no offsets, so no entity would
have its span, and the pipeline refuses every strategy but ``simple`` with it.

A text longer than the model takes is truncated, as the pipeline truncates it, and the entities past the cut
are not found; with ``stride`` (a number of tokens, at most half the model's length) the pipeline reads the
whole text instead, in windows of the model's length that overlap by ``stride`` tokens, one forward pass a
window (a text of ``max_text_chars`` can take tens of them). Registry ``parameters``:
``{"aggregation_strategy": "first" | "average" | "max" | "simple", "stride": 128}``. A request may choose
its own ``aggregation_strategy`` (``TokenParameters``), in place of the entry's.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deployments.runtimes.packing import Packing, run_batch
from deployments.runtimes.transformers import PipelineRuntime, checked_tokens, forward_batch, in_forward_passes
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import ENTITIES
from serve_app.core.tasks import Task

Strategy = Literal["simple", "first", "average", "max"]
STRATEGIES = get_args(Strategy)
DEFAULT_STRATEGY: Strategy = "simple"
"""A registry entry's strategy when it names none (the one ``simple_entities`` computes)."""


class TokenClassificationRuntime(PipelineRuntime):
    task = "token-classification"
    entry_parameters = frozenset({"aggregation_strategy", "stride"})
    pipeline_task = "token-classification"
    model_class = "AutoModelForTokenClassification"

    def pipeline_kwargs(self) -> dict[str, Any]:
        strategy = self.spec.parameters.get("aggregation_strategy", DEFAULT_STRATEGY)
        if strategy not in STRATEGIES:
            raise ValueError(f"aggregation_strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        stride = self.spec.parameters.get("stride")
        if stride is not None:
            checked_tokens(stride, "stride", least=0)
        return {"aggregation_strategy": strategy, **({"stride": stride} if stride is not None else {})}

    def load(self) -> None:
        super().load()
        if not self.pipeline.tokenizer.is_fast:
            name = type(self.pipeline.tokenizer).__name__
            self.pipeline = None
            raise ValueError(
                f"its tokenizer ({name}) is not a fast one: token classification needs the offsets of each token in "
                "the text, which only a fast tokenizer (transformers' tokenizers backend) gives"
            )
        # Batches (the pipeline's and simple_entities') are padded on the tokenizer's side: on the right, a model
        # of absolute positions reads each text at the positions it has alone.
        self.pipeline.tokenizer.padding_side = "right"
        self.packing = Packing.checked(self.pipeline.model, self.pipeline.tokenizer, lambda output: output["logits"])
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
        pipe = self.loaded_pipeline
        strategy = aggregation_strategy or self.spec.parameters.get("aggregation_strategy", DEFAULT_STRATEGY)
        if strategy == "simple" and self.spec.parameters.get("stride") is None:
            packing = self.packing
            find = lambda texts: simple_entities(pipe, texts, packing)  # noqa: E731
            return in_forward_passes(inputs, forward_batch(pipe.tokenizer), find)
        return self.run_pipeline(
            inputs, **({"aggregation_strategy": aggregation_strategy} if aggregation_strategy else {})
        )


def simple_entities(pipe: Any, texts: list[str], packing: Packing | None = None) -> list[list[dict[str, Any]]]:
    """The entities of each text as ``pipe`` (transformers' token-classification pipeline, with a fast
    tokenizer) finds them with ``aggregation_strategy="simple"`` and no stride, in one forward pass: the texts
    tokenized and truncated as its ``preprocess`` does them, padded together on the tokenizer's side (the
    runtime sets it to the right at load, so that each text's tokens keep the positions they have alone); the
    scores of each token a softmax of its logits (float32 for a half-precision model, as the pipeline makes
    them); the text's tokens grouped in runs by the pipeline's own ``get_tag`` rule (a token joins the run before it if
    it has the same tag and is not a ``B-``); a run of ``O`` dropped before it is made into an entity, which
    the pipeline does after. An entity's score, ``word`` and span are computed as the pipeline computes them
    (a unit test holds the answers to the pipeline's). The batch runs packed where ``packing`` finds it worth it.
    """
    import torch

    tokenizer, model = pipe.tokenizer, pipe.model
    encoded = tokenizer(
        texts,
        return_tensors="pt",
        padding=len(texts) > 1,  # one text alone is not padded: a tokenizer without a pad token takes one a pass
        truncation=bool(tokenizer.model_max_length and tokenizer.model_max_length > 0),
        return_special_tokens_mask=True,
        return_offsets_mapping=True,
    )
    offsets = encoded.pop("offset_mapping").tolist()
    skip = encoded.pop("special_tokens_mask").bool()
    if "attention_mask" in encoded:  # padding (a tokenizer may return no mask; it then pads nothing)
        skip |= encoded["attention_mask"] == 0
    with torch.inference_mode():
        output = run_batch(packing, model, {k: v.to(model.device) for k, v in encoded.items()})
    logits = output["logits"] if isinstance(output, dict) else output[0]  # a tuple with return_dict false
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.to(torch.float32)
    logits = logits.cpu().numpy()
    shifted = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    scores = shifted / shifted.sum(axis=-1, keepdims=True)
    best = scores.argmax(axis=-1)
    ids, unknown = encoded["input_ids"].tolist(), tokenizer.unk_token_id
    answers = []
    for row, (text, skipped) in enumerate(zip(texts, skip.tolist(), strict=True)):
        # the labels of the text's own tokens only (a label map may have no entry for a special token's best)
        labels = {i: model.config.id2label[best[row, i]] for i, s in enumerate(skipped) if not s}
        entities = []
        for run in _runs(pipe, labels):
            group = labels[run[0]].split("-", 1)[-1]
            if group == "O":  # the pipeline's ignore_labels
                continue
            spans = [offsets[row][i] for i in run]
            tokens = [
                text[start:end] if ids[row][i] == unknown else tokenizer.convert_ids_to_tokens(ids[row][i])
                for i, (start, end) in zip(run, spans, strict=True)
            ]
            entities.append(
                {
                    "entity_group": group,
                    "score": np.mean(np.nanmean([scores[row, i, best[row, i]] for i in run])),
                    "word": tokenizer.convert_tokens_to_string(tokens),
                    "start": spans[0][0],
                    "end": spans[-1][1],
                }
            )
        answers.append(entities)
    return answers


def _runs(pipe: Any, labels: dict[int, str]) -> list[list[int]]:
    """The positions of a text's tokens (``labels``: each one's label, in order), in runs that the pipeline
    groups into one entity: a token joins the run before it if its tag is the same and it is not a ``B-``
    (``pipe.get_tag``)."""
    runs: list[list[int]] = []
    last = None
    for i, label in labels.items():
        bi, tag = pipe.get_tag(label)
        if runs and tag == last and bi != "B":
            runs[-1].append(i)
        else:
            runs.append([i])
        last = tag
    return runs


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
