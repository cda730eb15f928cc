"""Tiny, randomly initialised transformers models for tests and the benchmark smoke run, built in well under a
second each.

Each tiny model has its own label names (``<model id>-0``, ``<model id>-1``, ...),
so a response shows which model produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "the a movie was great bad win free iphone now hello world this is spam not good".split()  # noqa: SIM905


def labels_for(model_id: str, n: int = 2) -> list[str]:
    return [f"{model_id}-{k}" for k in range(n)]


def build_bert(
    folder: Path,
    head: str,
    labels: list[str],
    seed: int = 0,
    *,
    hidden: int = 16,
    layers: int = 1,
    heads: int = 2,
    intermediate: int = 32,
) -> Path:
    """A randomly initialised BERT model with ``head`` (a transformers class: ``BertForSequenceClassification``,
    ``BertForTokenClassification``) over ``labels``, and a word-level tokenizer of ``WORDS``, saved in
    ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # ``vocab``: transformers 5 takes the vocabulary there (a ``vocab_file`` argument is ignored, and every
    # word would be [UNK])
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32)
    assert tokenizer.tokenize("hello world") == ["hello", "world"], "the tiny tokenizer knows no words"
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    getattr(transformers, head)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_text_model(folder: Path, model_id: str, seed: int = 0, dense_size: int = 32) -> Path:
    """A tiny BERT classifier. ``dense_size`` widens its one feed-forward layer (32 floats a unit), which
    every prediction reads whole, to make the model as heavy in memory as a test needs. (Weights that no
    prediction reads, such as unused embedding rows, would stay on disk: the weights are memory-mapped.)"""
    return build_bert(folder, "BertForSequenceClassification", labels_for(model_id), seed, intermediate=dense_size)


ENTITY_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
"""The tags of the tiny token classifiers (``build_token_model``)."""


def build_token_model(folder: Path, model_id: str, seed: int = 0) -> Path:
    """A tiny BERT token classifier (named-entity tags ``ENTITY_LABELS``), for token-classification: random
    weights, so the entities it finds mean nothing, but the pipeline and the app answer them alike."""
    return build_bert(folder, "BertForTokenClassification", ENTITY_LABELS, seed)


def build_image_model(folder: Path, model_id: str, seed: int = 0, labels: int = 3) -> Path:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessorPil

    labels = labels_for(model_id, labels)
    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ResNetForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_clip_model(folder: Path, tokenizer_of: Path, seed: int = 7) -> Path:
    """A tiny CLIP (random weights: texts and images in one space of 12 floats) with an image processor and,
    for its texts, the tokenizer of the tiny text model in ``tokenizer_of``."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": 64, "max_position_embeddings": 32, "eos_token_id": 3},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_of).save_pretrained(folder)
    return folder


def build_sentence_model(folder: Path, text_model: Path, prompts: dict[str, str]) -> Path:
    """A sentence-transformers model of the tiny text model in ``text_model`` (its encoder, mean pooling,
    normalised) with ``prompts`` (``config_sentence_transformers.json``), written as sentence-transformers
    saves one, without it."""
    import shutil

    shutil.copytree(text_model, folder)
    dimension = json.loads((folder / "config.json").read_text())["hidden_size"]
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"embedding_dimension": dimension, "pooling_mode": "mean", "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "2_Normalize").mkdir()
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return folder


def write_registry(path: Path, models: dict[str, tuple[str, Path]], preload: list[str] = ()) -> Path:
    """models: id -> (task, folder); preload: ids marked to load when a replica starts."""
    entries = [
        {
            "id": mid,
            "task": task,
            "source": {"path": str(folder)},
            "labels": labels_for(mid, 3 if task == "image-classification" else 2),
            "preload": mid in preload,
        }
        for mid, (task, folder) in models.items()
    ]
    path.write_text(json.dumps({"models": entries}, indent=1))
    return path
