"""``feature-extraction``: sentences in, one embedding each, pooled and normalised as the model was trained.

The pooling comes from the model's own sentence-transformers files, when it has them: ``modules.json``
(the modules in order: the transformer, its folder; a ``Normalize`` module means unit-length vectors) and
the pooling module's ``config.json`` (``pooling_mode_mean_tokens``, ``..._cls_token``, ``..._max_tokens``,
``..._mean_sqrt_len_tokens``), with ``sentence_bert_config.json``'s ``max_seq_length``. A model without
them is mean-pooled and not normalised. Registry ``parameters`` override either: ``{"pooling": "mean" |
"cls" | "max" | "mean_sqrt_len", "normalize": true | false, "max_seq_length": 128}``.

Each batch is one tokenizer call and one forward pass (up to 32 sentences a pass), as sentence-transformers'
``encode`` computes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deployments.runtimes.base import ModelRuntime
from deployments.runtimes.transformers import forward_batch, in_forward_passes, quiet_tokenizers
from serve_app.core.inputs import TEXT
from serve_app.core.outputs import EMBEDDING
from serve_app.core.tasks import Task

POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def _file(model: str, revision: str | None, name: str) -> Path | None:
    """One file of a model (a local folder's, or a hub revision's from the local cache), or None."""
    from transformers.utils import cached_file

    found = cached_file(
        model,
        name,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_gated_repo=False,
    )
    return Path(found) if found else None


def sentence_transformers_config(model: str, revision: str | None) -> dict[str, Any]:
    """The pooling, normalisation, transformer folder and maximum length a sentence-transformers model was
    trained with (an empty dict for a model without sentence-transformers files)."""
    modules_file = _file(model, revision, "modules.json")
    if modules_file is None:
        return {}
    modules = json.loads(modules_file.read_text())
    config: dict[str, Any] = {"normalize": any(m["type"].endswith(".Normalize") for m in modules)}
    for m in modules:
        kind, path = m["type"].rsplit(".", 1)[-1], m.get("path", "")
        if kind == "Transformer":
            config["subfolder"] = path
            bert = _file(model, revision, f"{path}/sentence_bert_config.json" if path else "sentence_bert_config.json")
            if bert is not None:
                config["max_seq_length"] = json.loads(bert.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            pooling = json.loads(_file(model, revision, f"{path}/config.json").read_text())
            modes = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
            other = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in POOLING_MODES]
            if other or len(modes) != 1:
                raise ValueError(f"unsupported sentence-transformers pooling: {other or modes}")
            config["pooling"] = modes[0]
        elif kind not in ("Normalize",):
            raise ValueError(f"unsupported sentence-transformers module {m['type']!r}")
    return config


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Token embeddings ``[batch, tokens, dim]`` to sentence embeddings ``[batch, dim]``, padding left out."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed, counts = (hidden * mask).sum(dim=1), mask.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


class SentenceEmbeddingRuntime(ModelRuntime):
    task = "feature-extraction"

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        quiet_tokenizers()
        model, revision = self.spec.source.reference()
        config = {"pooling": "mean", "normalize": False, **sentence_transformers_config(model, revision)}
        config.update(
            {k: v for k, v in self.spec.parameters.items() if k in ("pooling", "normalize", "max_seq_length")}
        )
        if config["pooling"] not in POOLING_MODES.values():
            raise ValueError(f"unknown pooling {config['pooling']!r}: one of {', '.join(POOLING_MODES.values())}")
        sub = {"subfolder": config["subfolder"]} if config.get("subfolder") else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, **sub)
        self.model = AutoModel.from_pretrained(model, revision=revision, trust_remote_code=False, **sub)
        self.model.to(self.device).eval()
        self.pooling, self.normalize = config["pooling"], bool(config["normalize"])
        self.max_length = config.get("max_seq_length") or None

    def unload(self) -> None:
        self.model = self.tokenizer = None

    def predict(self, inputs: list[str]) -> list[Any]:
        model, tokenizer = self.model, self.tokenizer  # local references: an unload meanwhile breaks nothing
        if model is None:
            raise RuntimeError(f"model {self.spec.id!r} is not loaded")
        return in_forward_passes(inputs, forward_batch(tokenizer), lambda texts: self._embed(model, tokenizer, texts))

    def _embed(self, model: Any, tokenizer: Any, texts: list[str]) -> list[Any]:
        import torch

        with torch.inference_mode():
            encoded = tokenizer(
                texts, truncation=True, max_length=self.max_length, padding=len(texts) > 1, return_tensors="pt"
            ).to(model.device)
            hidden = model(**encoded).last_hidden_state
            vectors = pool(hidden, encoded["attention_mask"], self.pooling)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            return list(vectors.float().cpu().numpy())


TASK = Task(
    name="feature-extraction",
    input=TEXT,
    output=EMBEDDING,
    runtimes=(SentenceEmbeddingRuntime,),
    description="one embedding per sentence, pooled and normalised as the model was trained (search, RAG)",
)
