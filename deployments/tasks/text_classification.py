"""``text-classification``: strings in, every label with its score out (``serve_app.core.outputs.Classification``).

The runtime loads the model and its tokenizer with transformers' pipeline, then runs a batch as one
tokenizer call, one forward pass and the pipeline's score function: what the text-classification pipeline
computes for each input (its scores, to float precision), without its per-input loop (a data loader, and
its pre- and post-processing per input). docs/performance.md has what that saves. A batch is padded on the
right, so that a text's scores do not depend on what shares its batch, and its texts are packed without
their padding where that is faster and gives the same scores (``deployments.runtimes.packing``). Text
longer than the model's maximum length is truncated.
"""

from __future__ import annotations

import inspect
from typing import Any

from deployments.runtimes.packing import Packing, run_batch
from deployments.runtimes.transformers import PipelineRuntime, forward_batch, in_forward_passes
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import CLASSIFICATION, ClassificationParameters
from serve_app.core.tasks import Task


class TextClassificationRuntime(PipelineRuntime):
    task = "text-classification"
    pipeline_task = "text-classification"
    model_class = "AutoModelForSequenceClassification"

    def load(self) -> None:
        super().load()
        # As the pipeline calls a classifier: without a cache, for models whose forward takes one.
        forward = inspect.signature(self.pipeline.model.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in forward else {}
        self.packing = Packing.checked(
            self.pipeline.model, self.pipeline.tokenizer, lambda output: output.logits, **self._forward_kwargs
        )

    def predict(self, inputs: list[str]) -> list[list[tuple[str, float]]]:
        pipe, packing = self.loaded_pipeline, self.packing
        classify = lambda texts: self._classify(pipe, packing, texts)  # noqa: E731
        return in_forward_passes(inputs, forward_batch(pipe.tokenizer), classify)

    def _classify(self, pipe: Any, packing: Packing | None, texts: list[str]) -> list[list[tuple[str, float]]]:
        import torch

        model, config = pipe.model, pipe.model.config
        with torch.inference_mode():
            # padded on the right whatever side the tokenizer pads: a model of absolute positions reads each
            # text at the positions it has alone (a decoder's classifier finds its last token on either side)
            encoded = pipe.tokenizer(
                texts, truncation=True, padding=len(texts) > 1, padding_side="right", return_tensors="pt"
            )
            logits = run_batch(packing, model, encoded.to(model.device), **self._forward_kwargs).logits.float()
            # The pipeline's default score function: none for regression, a sigmoid for multi-label and
            # single-logit models, else a softmax.
            if config.problem_type == "regression":
                scores = logits
            elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
                scores = logits.sigmoid()
            else:
                scores = logits.softmax(-1)
            rows = scores.cpu().tolist()
        labels = config.id2label
        return [sorted(((labels[j], s) for j, s in enumerate(row)), key=lambda p: -p[1]) for row in rows]


TASK = Task(
    name="text-classification",
    input=TEXT,
    output=CLASSIFICATION,
    parameters=ClassificationParameters,
    runtimes=(TextClassificationRuntime,),
    description="labels for a text, each with its score (sentiment, spam, topic, intent)",
)
