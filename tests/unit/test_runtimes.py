import gc
import os
import pickle
import shutil
import weakref

import pytest

from deployments.runtimes import RUNTIMES, runtime_for
from deployments.runtimes.image_classification import ImageClassificationRuntime
from deployments.runtimes.text_classification import TextClassificationRuntime
from serve_app.core.errors import BadImage, ModelNotFound, ModelUnavailable
from serve_app.core.paths import PROJECT_ROOT
from serve_app.core.registry import ModelSpec, Task


def _spec(model_id, task, folder) -> ModelSpec:
    return ModelSpec(id=model_id, task=task, source={"path": str(folder)})


def test_every_task_has_a_runtime():
    assert set(RUNTIMES) == set(Task)
    for task, cls in RUNTIMES.items():
        assert cls.task is task


def test_text_runtime_loads_predicts_and_describes(tiny_dir):
    rt = runtime_for(_spec("alpha", Task.TEXT_CLASSIFICATION, tiny_dir / "alpha"), device="cpu")
    assert isinstance(rt, TextClassificationRuntime) and not rt.loaded
    rt.load()
    out = rt.predict(["hello world", "win a free iphone now"])
    assert len(out) == 2
    for scores in out:
        assert {s.label for s in scores} == {"alpha-0", "alpha-1"}
        assert scores[0].score >= scores[1].score
        assert sum(s.score for s in scores) == pytest.approx(1.0, abs=1e-4)
    assert rt.spec.id == "alpha" and rt.loaded and rt.load_seconds > 0


TEXTS = ["hello world", "win a free iphone now", "this movie was great " * 40, "bad", "the movie"] * 9


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
    rt = runtime_for(_spec("alpha", Task.TEXT_CLASSIFICATION, folder), device="cpu").load()
    got = rt.predict(TEXTS)
    assert len(got) == len(TEXTS)
    for scores, want in zip(got, expected, strict=True):
        assert [s.label for s in scores] == [w["label"] for w in want]
        assert [s.score for s in scores] == pytest.approx([w["score"] for w in want], abs=1e-6)


def test_a_text_model_tokenizes_a_batch_in_the_calling_thread(tiny_dir, monkeypatch):
    """Not on the tokenizers library's pool of one thread per core, as the pipeline ensures on its first call."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    runtime_for(_spec("alpha", Task.TEXT_CLASSIFICATION, tiny_dir / "alpha"), device="cpu").load()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # an operator's own choice stays
    runtime_for(_spec("alpha", Task.TEXT_CLASSIFICATION, tiny_dir / "alpha"), device="cpu").load()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_overlong_text_is_truncated_not_a_crash(tiny_dir):
    rt = runtime_for(_spec("alpha", Task.TEXT_CLASSIFICATION, tiny_dir / "alpha"), device="cpu").load()
    (scores,) = rt.predict(["this movie was great " * 500])  # far beyond the 32-token maximum
    assert scores[0].label.startswith("alpha-")


def test_image_runtime_takes_encoded_bytes(tiny_dir):
    rt = runtime_for(_spec("pixels", Task.IMAGE_CLASSIFICATION, tiny_dir / "pixels"), device="cpu").load()
    assert isinstance(rt, ImageClassificationRuntime)
    (scores,) = rt.predict([(PROJECT_ROOT / "samples/images/square.jpg").read_bytes()])
    assert {s.label for s in scores} == {"pixels-0", "pixels-1", "pixels-2"}
    with pytest.raises(BadImage):
        rt.predict([b"not an image"])


def test_a_truncated_image_is_a_bad_image_when_the_worker_decodes_it(tiny_dir):
    # The ingress checks image headers only; the worker decodes each image once, in prepare.
    rt = runtime_for(_spec("pixels", Task.IMAGE_CLASSIFICATION, tiny_dir / "pixels"), device="cpu")
    raw = (PROJECT_ROOT / "samples/images/image.jpg").read_bytes()
    (image,) = rt.prepare([raw])
    assert image.size == (224, 224)
    with pytest.raises(BadImage):
        rt.prepare([raw[: len(raw) // 2]])


def test_unload_releases_the_model(tiny_dir):
    rt = runtime_for(_spec("beta", Task.TEXT_CLASSIFICATION, tiny_dir / "beta"), device="cpu").load()
    model_ref = weakref.ref(rt._pipeline.model)
    rt.__del__()  # what Ray Serve's LRU calls on eviction
    gc.collect()
    assert not rt.loaded
    assert model_ref() is None, "the weights are still referenced after unload"
    with pytest.raises(RuntimeError, match="not loaded"):
        rt.predict(["hello"])


def test_missing_model_files_fail_to_load(tmp_path):
    rt = runtime_for(_spec("ghost", Task.TEXT_CLASSIFICATION, tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(OSError):
        rt.load()
    assert not rt.loaded


def test_runtime_refuses_a_spec_of_another_task(tiny_dir):
    with pytest.raises(ValueError, match="serves text-classification"):
        TextClassificationRuntime(_spec("pixels", Task.IMAGE_CLASSIFICATION, tiny_dir / "pixels"))


@pytest.mark.parametrize(
    "err", [ModelNotFound("x", ["a", "b"]), ModelUnavailable("boom", model_id="x"), BadImage("bad")]
)
def test_errors_survive_pickling_with_their_details(err):
    # Errors raised in a worker replica cross a process boundary through pickle.
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert back.body() == err.body() and back.status_code == err.status_code


def test_unload_during_a_request_waits_for_it(tiny_dir):
    rt = runtime_for(_spec("gamma", Task.TEXT_CLASSIFICATION, tiny_dir / "gamma"), device="cpu").load()
    with rt.in_use():
        rt.unload()  # the LRU evicts it while a request holds it
        assert rt.loaded
        assert rt.predict(["still answered"])[0][0].label.startswith("gamma-")
    assert not rt.loaded  # released when the request finished


def test_a_model_evicted_while_in_use_is_taken_back_instead_of_loaded_again(tiny_dir):
    rt = runtime_for(_spec("delta", Task.TEXT_CLASSIFICATION, tiny_dir / "delta"), device="cpu").load()
    told = []
    rt.on_unload = told.append
    with rt.in_use():
        assert rt.unload() is True  # the LRU evicts it while a request holds it: the free waits
        assert told == [True]
        rt.__del__ = lambda _: None  # what Serve's LRU does to the model it evicted
        assert rt.revive() and rt.loaded  # a new request wants it before the free: taken back
    assert rt.loaded  # the request finished, and the revived model stays
    model_ref = weakref.ref(rt._pipeline.model)
    rt.__del__()  # the next eviction runs the real __del__, not Serve's no-op
    gc.collect()
    assert not rt.loaded and model_ref() is None
    assert not rt.revive()  # freed: nothing to take back


def test_a_model_freed_when_its_last_request_ended_cannot_be_revived(tiny_dir):
    rt = runtime_for(_spec("delta", Task.TEXT_CLASSIFICATION, tiny_dir / "delta"), device="cpu").load()
    with rt.in_use():
        rt.unload()
    assert not rt.revive()


def test_a_very_large_image_is_shrunk_to_1024_pixels_a_side_when_decoded():
    import io

    from PIL import Image

    from deployments.runtimes.image_classification import MAX_SIDE, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (20, 120, 200)).save(buf, format="JPEG", quality=60)
    assert decode_image(buf.getvalue()).size == (MAX_SIDE, 683) and MAX_SIDE == 1024


def test_only_the_allowed_image_formats_are_decoded():
    import io

    from PIL import Image

    from deployments.runtimes.image_classification import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(BadImage, match="allowed format"):
        decode_image(buf.getvalue())
