"""``image-classification``: encoded images in, every label with its score out.

Each image is decoded once, in ``prepare`` (a thread, before batching); a batch then runs through
transformers' image-classification pipeline in one forward pass.
"""

from __future__ import annotations

from typing import Any

from deployments.runtimes.images import decode_images
from deployments.runtimes.transformers import PipelineRuntime
from serve_app.core.inputs import IMAGE
from serve_app.core.outputs import CLASSIFICATION, ClassificationParameters
from serve_app.core.tasks import Task


class ImageClassificationRuntime(PipelineRuntime):
    task = "image-classification"
    pipeline_task = "image-classification"
    model_class = "AutoModelForImageClassification"
    preprocessor = "image_processor"

    def prepare(self, inputs: list[Any]) -> list[Any]:
        return decode_images(inputs)

    def predict(self, inputs: list[Any]) -> list[list[tuple[str, float]]]:
        # every label: the pipeline's own default is its top 5 (top_k=None keeps that default)
        out = self.run_pipeline(decode_images(inputs), top_k=self.loaded_pipeline.model.config.num_labels)
        return [[(d["label"], float(d["score"])) for d in row] for row in out]


TASK = Task(
    name="image-classification",
    input=IMAGE,
    output=CLASSIFICATION,
    parameters=ClassificationParameters,
    runtimes=(ImageClassificationRuntime,),
    description="labels for an image, each with its score",
)
