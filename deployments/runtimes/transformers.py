"""What the shipped runtimes share: a model loaded with transformers, from a local folder or a pinned hub
revision, never with remote code."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

from deployments.runtimes.base import ModelRuntime

MAX_FORWARD_BATCH = 32
"""Most inputs in one forward pass (a batch of requests times their list inputs can be larger)."""


def quiet_tokenizers() -> None:
    """A fast tokenizer encodes a batch in the calling thread, not on a pool of one thread per core (a
    replica runs on its torch_threads), as a pipeline sets it on its first call. A value set already wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


POSITION_TABLES = ("position_embeddings", "position_embedding")
"""Names of a table of absolute positions beside a model's token embeddings (CLIP's and SigLIP's text towers
use the singular)."""


def _token_embeddings(model: Any) -> Any | None:
    """The embedding of the tokens a text model reads: ``get_input_embeddings()``, or, for a model of texts
    and images that does not say (CLIP), its text tower's."""
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        text = getattr(model, "text_model", None)
        embeddings = getattr(text, "embeddings", None)
        return getattr(embeddings, "token_embedding", None) or getattr(embeddings, "word_embeddings", None)


def position_table(model: Any) -> Any | None:
    """The table of absolute position embeddings beside ``model``'s token embeddings (in the same module), or
    None. Only that table counts: a model of texts and images (CLIP, SigLIP) has one of image patches too,
    wherever its image tower is. A model of relative or rotary positions (DeBERTa v2 and v3, ModernBERT, T5)
    has none."""
    import torch

    tokens = _token_embeddings(model)
    if tokens is None:
        return None
    for module in model.modules():
        if any(child is tokens for child in module.children()):
            for name, table in module.named_children():
                if name in POSITION_TABLES and isinstance(table, torch.nn.Embedding):
                    return table
            return None
    return None


def first_position(table: Any) -> int:
    """The first position id of a text in a table of absolute positions: 0, or ``padding_idx + 1`` for a model
    whose position ids start after the padding token's (RoBERTa and its kin)."""
    return table.padding_idx + 1 if isinstance(table.padding_idx, int) else 0


def position_limit(model: Any) -> int | None:
    """The most tokens ``model`` takes: the rows of its table of absolute positions (``position_table``), less
    those before the first position (``first_position``, as sentence-transformers counts them). None for a
    model without such a table, which takes any length."""
    table = position_table(model)
    if table is None:
        return None
    return table.num_embeddings - first_position(table)


def bound_tokenizer(tokenizer: Any, model: Any) -> int | None:
    """Cap ``tokenizer.model_max_length``, the length its truncation keeps, at the tokens the model can take
    (``position_limit``), and return that limit: a tokenizer saved without a maximum reports about 1e30 and
    would truncate nothing, and a longer text would then fail in the model instead of being truncated."""
    limit = position_limit(model)
    if tokenizer is not None and limit is not None and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    return limit


def checked_flag(value: Any, what: str) -> bool:
    """A registry parameter that is true or false (JSON's ``true``/``false``); ValueError for anything else: the
    string ``"false"`` would be taken as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} {value!r}: true or false")
    return value


def checked_tokens(value: Any, what: str, least: int) -> int:
    """A registry parameter that is a number of tokens, at least ``least``; ValueError for anything else (a
    bool, a float, a string)."""
    if type(value) is not int or value < least:
        raise ValueError(f"{what} {value!r}: a number of tokens, {least} or more")
    return value


def trained_weights(info: dict[str, Any], may_lack: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Check that a model's checkpoint holds its weights (``from_pretrained``'s ``output_loading_info``): a
    ValueError naming those it lacks, which transformers initialised at random, except those ``may_lack``
    allows; those are returned, sorted (random, so the caller must not read them). A model with random
    weights answers noise (a base checkpoint registered as a classifier gets a random head), and
    transformers' warning of it is silenced in the replicas. BatchNorm's counters of training steps
    (``num_batches_tracked``, which inference never reads) may always be missing, as torch allows."""
    missing = [key for key in sorted(info.get("missing_keys") or ()) if not key.endswith("num_batches_tracked")]
    untrained = [key for key in missing if not may_lack(key)]
    if untrained:
        more = f" and {len(untrained) - 5} more" if len(untrained) > 5 else ""
        raise ValueError(f"the checkpoint lacks weights of the model, which would be random: {untrained[:5]}{more}")
    return missing


def joint_space(model: Any) -> bool:
    """Whether ``model`` puts texts and images in one space (CLIP, SigLIP: a tower of each, projected)."""
    return hasattr(model, "get_text_features") and hasattr(model, "get_image_features")


def projected(features: Any) -> Any:
    """A joint-space model's ``get_text_features`` or ``get_image_features``, as vectors: a tensor, or (as
    transformers 5 answers) its output's ``pooler_output``."""
    import torch

    return features if isinstance(features, torch.Tensor) else features.pooler_output


def embedding_rows(vectors: Any, normalize: bool) -> list[Any]:
    """An embedding runtime's answer for a batch of vectors ``[batch, dim]``: one float32 vector a row, of unit
    length if ``normalize``."""
    import torch

    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return list(vectors.float().cpu().numpy())


def forward_batch(tokenizer: Any) -> int:
    """Most inputs in one forward pass: MAX_FORWARD_BATCH, or one for a tokenizer without a pad token, which
    cannot pad a batch."""
    return MAX_FORWARD_BATCH if tokenizer is None or tokenizer.pad_token_id is not None else 1


def in_forward_passes(inputs: list[Any], step: int, forward: Callable[[list[Any]], list[Any]]) -> list[Any]:
    """``forward`` over ``inputs`` in passes of at most ``step`` inputs: each input's row, in order."""
    return [row for i in range(0, len(inputs), step) for row in forward(inputs[i : i + step])]


class PipelineRuntime(ModelRuntime):
    """A model behind ``transformers.pipeline`` for its task (``pipeline_task``), loaded with the
    transformers class of that task (``model_class``, as the pipeline would load it) and refused if its
    checkpoint lacks any of the model's weights (``trained_weights``)."""

    pipeline_task: ClassVar[str]
    model_class: ClassVar[str]
    """The transformers auto class the pipeline loads for its task: ``AutoModelForSequenceClassification``."""
    preprocessor: ClassVar[str] = "tokenizer"
    """The pipeline's argument that takes its preprocessor (``image_processor`` for images), read from the
    model's files."""
    entry_parameters: ClassVar[frozenset[str] | None] = frozenset()

    def __init__(self, spec, device: str | None = None) -> None:
        super().__init__(spec, device)
        self.pipeline: Any = None

    def load(self) -> None:
        import transformers

        quiet_tokenizers()
        model, revision = self.model_files()
        auto_class = getattr(transformers, self.model_class)
        loaded, info = auto_class.from_pretrained(
            model, revision=revision, trust_remote_code=False, output_loading_info=True
        )
        try:
            trained_weights(info)
        except ValueError:
            del loaded  # not held by the traceback while the worker frees what the failed load made
            raise
        self.pipeline = transformers.pipeline(  # the model as loaded, its preprocessor from the same files
            task=self.pipeline_task,
            model=loaded,
            **{self.preprocessor: model},
            revision=revision,
            trust_remote_code=False,
            device=self.device,
            **self.pipeline_kwargs(),
        )
        bound_tokenizer(getattr(self.pipeline, "tokenizer", None), self.pipeline.model)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """More arguments of ``transformers.pipeline``."""
        return {}

    def unload(self) -> None:
        # The packing's hook stays on the model, which a call may still run on, and goes with it.
        self.pipeline = self.packing = None

    @property
    def loaded_pipeline(self) -> Any:
        """The pipeline (a local reference: an unload during a call does not break it)."""
        pipe = self.pipeline
        if pipe is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        return pipe

    def run_pipeline(self, inputs: list[Any], **kwargs: Any) -> list[Any]:
        """The pipeline over a batch, in as few forward passes as it allows (its default runs inputs one by one:
        several times slower per input on one CPU thread). One input runs through the pipeline's own steps for
        one input (``run_single``: preprocess, forward, postprocess), without the data loader that its
        ``__call__`` builds around a list: the same answer, in less time (docs/performance.md)."""
        pipe = self.loaded_pipeline
        if len(inputs) == 1:
            return [pipe.run_single(inputs[0], *self._step_parameters(pipe, kwargs))]
        return pipe(inputs, batch_size=min(len(inputs), forward_batch(getattr(pipe, "tokenizer", None))), **kwargs)

    def _step_parameters(self, pipe: Any, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """The parameters of the pipeline's preprocess, forward and postprocess for a call with ``kwargs``,
        fused with those it was built with, as its ``__call__`` fuses them (transformers' own split of them,
        ``_sanitize_parameters``; a unit test holds the answers to the pipeline's)."""
        pre, forward, post = pipe._sanitize_parameters(**kwargs)
        return (
            {**pipe._preprocess_params, **pre},
            {**pipe._forward_params, **forward},
            {**pipe._postprocess_params, **post},
        )
