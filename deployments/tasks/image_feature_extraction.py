"""``image-feature-extraction``: images in, one embedding each.

The runtime loads the model's backbone (``AutoModel``: an image classifier's weights without its head)
and its image processor, and answers each image's pooled features: for a classifier, the layer before its
head. That is the model's ``pooler_output``, flattened, where the checkpoint holds the pooler's weights (a
ResNet's average pool has none); else the last hidden state, averaged over its positions for a
convolutional model, or its first token for a transformer (the class token, which the ViT family's
classifiers read: their checkpoints do not keep the pooler that ``AutoModel`` adds, which would be random).
A checkpoint that lacks any other weight of the backbone fails its load with their names: they would be
random too. A model of images and texts in one space (CLIP, SigLIP: ``get_image_features``) answers its
image embeddings, the vectors its texts are compared with. A model that reads text as well as images (a
vision-language model such as LLaVA) fails its load: it cannot embed an image alone. Registry
``parameters``: ``{"normalize": true}`` for unit-length vectors (default false).
"""

from __future__ import annotations

import inspect
from typing import Any

from deployments.runtimes.base import ModelRuntime
from deployments.runtimes.images import decode_images
from deployments.runtimes.transformers import (
    MAX_FORWARD_BATCH,
    checked_flag,
    embedding_rows,
    in_forward_passes,
    joint_space,
    projected,
    trained_weights,
)
from serve_app.core.inputs import IMAGE
from serve_app.core.outputs import EMBEDDING, EmbeddingOptions
from serve_app.core.tasks import Task


class ImageEmbeddingRuntime(ModelRuntime):
    task = "image-feature-extraction"
    entry_parameters = frozenset({"normalize"})

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModel

        model, revision = self.model_files()
        self.processor = AutoImageProcessor.from_pretrained(model, revision=revision)
        self.model, info = AutoModel.from_pretrained(
            model, revision=revision, trust_remote_code=False, output_loading_info=True
        )
        random = trained_weights(info, may_lack=lambda key: key.startswith("pooler."))
        self.pooler_trained = not random  # else its pooler is random: the hidden state instead (below)
        self.model.to(self.device).eval()
        # A model of images and texts in one space (both towers: CLIP, SigLIP, SigLIP 2): its projected image
        # features, with every input of its processor's that the method takes (SigLIP 2's patch masks).
        joint = joint_space(self.model)
        reads = inspect.signature(self.model.forward).parameters
        if not joint and ("input_ids" in reads or "pixel_values" not in reads):
            # A vision-language model (LLaVA) reads text with its images; ImageGPT and Perceiver read other
            # inputs: every request would fail in their forward pass.
            raise ValueError(
                f"{type(self.model).__name__} does not embed an image alone (its forward reads "
                f"{'input_ids' if 'input_ids' in reads else 'no pixel_values'}): this task serves image models "
                "and models of texts and images in one space (CLIP, SigLIP)"
            )
        self.image_features = inspect.signature(self.model.get_image_features).parameters if joint else None
        normalize = self.spec.parameters.get("normalize")  # null: not given
        self.normalize = normalize is not None and checked_flag(normalize, "normalize")

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
            processed = processor(images, return_tensors="pt")
            if self.image_features is not None:
                taken = {k: v.to(model.device) for k, v in processed.items() if k in self.image_features}
                return embedding_rows(projected(model.get_image_features(**taken)), self.normalize)
            out = model(pixel_values=processed["pixel_values"].to(model.device))
            pooled = getattr(out, "pooler_output", None) if self.pooler_trained else None
            if pooled is not None:
                vectors = pooled.flatten(1)
            else:  # [batch, tokens, dim]: the class token; [batch, channels, height, width]: the mean per channel
                hidden = out.last_hidden_state
                vectors = hidden[:, 0] if hidden.dim() == 3 else hidden.flatten(2).mean(-1)
            return embedding_rows(vectors, self.normalize)


TASK = Task(
    name="image-feature-extraction",
    input=IMAGE,
    output=EMBEDDING,
    runtimes=(ImageEmbeddingRuntime,),
    parameters=EmbeddingOptions,
    description="one embedding per image (similar-image search, deduplication)",
)
