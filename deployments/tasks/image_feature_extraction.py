"""``image-feature-extraction``: images in, one embedding each.

The runtime loads the model's backbone (``AutoModel``: an image classifier's weights without its head)
and its image processor, and answers each image's pooled features (the model's ``pooler_output``,
flattened; the mean of the last hidden state for a model without a pooler): for a classifier, the layer
before its head. Registry ``parameters``: ``{"normalize": true}`` for unit-length vectors (default false).
"""

from __future__ import annotations

from typing import Any

from deployments.runtimes.base import ModelRuntime
from deployments.runtimes.images import decode_images
from deployments.runtimes.transformers import MAX_FORWARD_BATCH, in_forward_passes
from serve_app.core.inputs import IMAGE
from serve_app.core.outputs import EMBEDDING
from serve_app.core.tasks import Task


class ImageEmbeddingRuntime(ModelRuntime):
    task = "image-feature-extraction"

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModel

        model, revision = self.spec.source.reference()
        self.processor = AutoImageProcessor.from_pretrained(model, revision=revision)
        self.model = AutoModel.from_pretrained(model, revision=revision, trust_remote_code=False)
        self.model.to(self.device).eval()
        self.normalize = bool(self.spec.parameters.get("normalize", False))

    def unload(self) -> None:
        self.model = self.processor = None

    def prepare(self, inputs: list[Any]) -> list[Any]:
        return decode_images(inputs)

    def predict(self, inputs: list[Any]) -> list[Any]:
        model, processor = self.model, self.processor
        if model is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        return in_forward_passes(
            decode_images(inputs), MAX_FORWARD_BATCH, lambda images: self._embed(model, processor, images)
        )

    def _embed(self, model: Any, processor: Any, images: list[Any]) -> list[Any]:
        import torch

        with torch.inference_mode():
            pixels = processor(images, return_tensors="pt")["pixel_values"].to(model.device)
            out = model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            vectors = pooled.flatten(1) if pooled is not None else out.last_hidden_state.flatten(2).mean(-1)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return list(vectors.float().cpu().numpy())


TASK = Task(
    name="image-feature-extraction",
    input=IMAGE,
    output=EMBEDDING,
    runtimes=(ImageEmbeddingRuntime,),
    description="one embedding per image (similar-image search, deduplication)",
)
