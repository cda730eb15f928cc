"""Tasks as the unit of extension, against the real app: each shipped task's demo model over the native API,
v2 REST and v2 gRPC (right answers on held-out inputs, metadata that describes what infer returns, bad
inputs refused with a clear 4xx); a task module from the tests directory added to an app's ``tasks`` and
served end to end; and runtime classes of the tests' own ("bring your own model") served, batched, evicted
by the LRU, and failing cleanly.

The demo app is serve_config.yaml's; the 'tasks' app has one worker replica, the shipped tasks plus
``tests.text_stats_task``, and ``tests.byo_runtimes`` in its ``runtime_modules``."""

import base64
import json
import threading

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from demo import entities
from demo.tiny_models import build_clip_model, build_sentence_model, labels_for
from serve_app.core.config import SHIPPED_TASKS
from serve_app.core.paths import PROJECT_ROOT
from tests.byo_runtimes import KEYWORDS, write_training_data
from tests.faulty_task import ENCODE_FAILS, FLOAT_COUNTS, NATIVE_FAILS, NUMPY_NATIVE
from tests.helpers import MODEL_ROOTS, wait_for

pytestmark = pytest.mark.integration

DEMO = {"application": "demo"}
PROMPTS = {"query": "this is ", "passage": "the movie "}  # words of the tiny models' vocabulary
TASKS = {"application": "tasks"}
IMAGES = PROJECT_ROOT / "samples/images"


@pytest.fixture(scope="module")
def grpc_client(grpc_target, demo_url, tasks_url):
    c = triton.InferenceServerClient(grpc_target)

    def routed(headers):
        try:
            return c.is_server_live(headers=headers)
        except InferenceServerException:
            return False

    assert wait_for(lambda: routed(DEMO) and routed(TASKS), timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def v2_http(demo_url):
    c = triton_http.InferenceServerClient(demo_url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


def predict(client, url, model_id, input_data):
    return client.post(f"{url}/predict", json={"model_id": model_id, "input_data": input_data})


def text_input(*texts: str) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def metadata_matches(meta: dict, outputs: dict[str, np.ndarray]) -> None:
    """What v2 metadata says a model answers is what its infer answered: the same tensors, in order, of the
    same datatypes and ranks, every fixed dimension equal (gRPC's JSON gives int64 dimensions as strings)."""
    numpy_of = {"FP32": np.float32, "INT64": np.int64, "BYTES": np.object_}
    assert [t["name"] for t in meta["outputs"]] == list(outputs)
    for spec in meta["outputs"]:
        array = outputs[spec["name"]]
        assert array.dtype == numpy_of[spec["datatype"]] and array.ndim == len(spec["shape"])
        assert all(int(want) in (-1, got) for want, got in zip(spec["shape"], array.shape, strict=True))


# -- feature-extraction: sentence embeddings --------------------------------------------------------------

# Held out: in no training data, and not among the demo build's own check.
TRIPLETS = [
    ("The flight was cancelled because of snow.", "Snow forced the airline to cancel the plane.", "I like jazz."),
    ("Can you recommend a good book?", "What novel should I read next?", "The pipe under the sink leaks."),
    ("The baby is sleeping.", "The infant is taking a nap.", "Interest rates went up again."),
]


def test_sentence_embeddings_over_every_protocol(client, demo_url, grpc_client, v2_http):
    texts = [t for triplet in TRIPLETS for t in triplet]
    r = predict(client, demo_url, "embed", texts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "embed" and body["task"] == "feature-extraction"
    vectors = np.array([p["embedding"] for p in body["predictions"]], dtype=np.float32).reshape(3, 3, -1)
    assert vectors.shape[-1] == 384 and np.allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-4)
    assert all(a @ p > a @ u for a, p, u in vectors)  # each paraphrase closer than the unrelated sentence

    meta = v2_http.get_model_metadata("embed")
    assert meta["platform"] == "transformers/feature-extraction" and meta["inputs"][0]["name"] == "text"
    tensor = triton_http.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([texts[0].encode(), texts[1].encode()], dtype=object))
    rest = v2_http.infer("embed", [tensor])
    metadata_matches(meta, {"embedding": rest.as_numpy("embedding")})
    np.testing.assert_allclose(rest.as_numpy("embedding"), vectors[0, :2], atol=1e-5)

    result = grpc_client.infer("embed", [text_input(texts[0])], headers=DEMO)
    metadata_matches(
        grpc_client.get_model_metadata("embed", headers=DEMO, as_json=True), {"embedding": result.as_numpy("embedding")}
    )
    np.testing.assert_allclose(result.as_numpy("embedding")[0], vectors[0, 0], atol=1e-5)

    # dimensions: each vector's first d values, of unit length again (the demo model's are), over each protocol
    def cut(v, d):
        return v[..., :d] / np.linalg.norm(v[..., :d], axis=-1, keepdims=True)

    body = {"model_id": "embed", "input_data": texts[:2], "parameters": {"dimensions": 64}}
    short = np.array([p["embedding"] for p in client.post(f"{demo_url}/predict", json=body).json()["predictions"]])
    np.testing.assert_allclose(short, cut(vectors[0, :2], 64), atol=1e-5)
    rest = v2_http.infer("embed", [tensor], parameters={"dimensions": 32})
    np.testing.assert_allclose(rest.as_numpy("embedding"), cut(vectors[0, :2], 32), atol=1e-5)
    result = grpc_client.infer("embed", [text_input(texts[0])], parameters={"dimensions": 16}, headers=DEMO)
    np.testing.assert_allclose(result.as_numpy("embedding")[0], cut(vectors[0, 0], 16), atol=1e-5)


# -- token-classification: named entities ------------------------------------------------------------------


def packed_batches(client, url: str, model_id: str) -> int:
    """The batches of ``model_id`` its replicas ran packed, without their padding (GET /models)."""
    return sum(r["packed_batches"].get(model_id, 0) for r in client.get(f"{url}/models").json()["replicas"])


def test_named_entities_over_every_protocol_are_the_pipelines_on_held_out_names(client, demo_url, grpc_client, v2_http):
    """The app's entities on the build's 40 held-out sentences (names not in the training lists) are what
    transformers' pipeline finds with the same model files in this process, at the F1 the build checked,
    each text alone; the app ran them in batches of 8 sentences of different lengths, packed without their
    padding."""
    from transformers import pipeline

    held_out = entities.sentences(40, entities.HELD_OUT_NAMES, seed=2)
    texts = [s.text for s in held_out]
    answers, packed = [], packed_batches(client, demo_url, "ner")
    for i in range(0, len(texts), 8):
        r = predict(client, demo_url, "ner", texts[i : i + 8])
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    assert wait_for(lambda: packed_batches(client, demo_url, "ner") >= packed + 5)
    want = pipeline("token-classification", model=str(PROJECT_ROOT / "models/ner"), aggregation_strategy="simple")(
        texts
    )
    strip = lambda rows: [[(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in rows]  # noqa: E731
    assert strip(answers) == strip(want)
    assert entities.entity_f1(held_out, answers) >= 0.8
    first = answers[0][0]
    assert set(first) == {"entity_group", "score", "word", "start", "end"} and 0 < first["score"] <= 1
    assert texts[0][first["start"] : first["end"]].lower() == first["word"]  # start and end index the text

    tensor = triton_http.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([texts[0].encode(), texts[1].encode()], dtype=object))
    rest = v2_http.infer("ner", [tensor])
    meta = v2_http.get_model_metadata("ner")
    outputs = {o["name"]: rest.as_numpy(o["name"]) for o in meta["outputs"]}
    metadata_matches(meta, outputs)
    flat = [(i, e["entity_group"], e["start"]) for i, row in enumerate(answers[:2]) for e in row]
    assert (
        list(
            zip(
                outputs["input"].tolist(),
                [g.decode() if isinstance(g, bytes) else g for g in outputs["entity_group"]],
                outputs["start"].tolist(),
                strict=True,
            )
        )
        == flat
    )

    result = grpc_client.infer("ner", [text_input(texts[0])], headers=DEMO)
    assert [w.decode() for w in result.as_numpy("word")] == [e["word"] for e in answers[0]]


def test_a_request_chooses_how_the_entities_tokens_are_merged(client, demo_url):
    """A request's aggregation_strategy in place of the entry's ("simple"): the pipeline's answer with that
    strategy, which differs from the simple one on these sentences (a name's pieces labelled as one word);
    a strategy the pipeline has not is a 422."""
    from transformers import pipeline

    texts = [s.text for s in entities.sentences(40, entities.HELD_OUT_NAMES, seed=2)]
    answers = []
    for i in range(0, len(texts), 8):
        body = {"model_id": "ner", "input_data": texts[i : i + 8], "parameters": {"aggregation_strategy": "max"}}
        r = client.post(f"{demo_url}/predict", json=body)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    model = str(PROJECT_ROOT / "models/ner")
    want, simple = (
        pipeline("token-classification", model=model, aggregation_strategy=s)(texts) for s in ("max", "simple")
    )

    def spans(rows):
        return [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in rows]

    def scores(rows):
        return [float(e["score"]) for row in rows for e in row]

    assert spans(answers) == spans(want) and scores(answers) == pytest.approx(scores(want), abs=1e-4)
    assert (spans(want), scores(want)) != (spans(simple), scores(simple))  # the strategy is what differs
    r = client.post(
        f"{demo_url}/predict",
        json={"model_id": "ner", "input_data": "x", "parameters": {"aggregation_strategy": "none"}},
    )
    assert r.status_code == 422 and "parameters.aggregation_strategy" in r.json()["message"], r.text


# -- image-feature-extraction ------------------------------------------------------------------------------


def test_image_embeddings_over_every_protocol(client, demo_url, grpc_client, v2_http):
    names = ["circle", "square", "triangle"]
    r = predict(
        client, demo_url, "image-embed", [f"samples/images/{n}.jpg" for n in names] + ["samples/images/image.jpg"]
    )
    assert r.status_code == 200, r.text
    vectors = np.array([p["embedding"] for p in r.json()["predictions"]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert names[int(np.argmax(vectors[:3] @ vectors[3]))] == "circle"  # the README's image.jpg is a circle

    image = base64.b64encode((IMAGES / "square.jpg").read_bytes()).decode()
    rest = client.post(
        f"{demo_url}/v2/models/image-embed/infer",
        json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]},
    )
    assert rest.status_code == 200, rest.text
    (out,) = rest.json()["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("embedding", "FP32", [1, vectors.shape[1]])

    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([(IMAGES / "square.jpg").read_bytes()], dtype=object))
    result = grpc_client.infer("image-embed", [tensor], headers=DEMO)
    metadata_matches(
        grpc_client.get_model_metadata("image-embed", headers=DEMO, as_json=True),
        {"embedding": result.as_numpy("embedding")},
    )
    np.testing.assert_allclose(result.as_numpy("embedding")[0], out["data"], rtol=1e-5, atol=1e-6)


def test_a_classification_request_chooses_its_top_k_over_every_protocol(client, demo_url, grpc_client):
    """top_k keeps each input's k most likely labels in its scores; its label is the same whatever k; a k that is
    not a whole number of at least 1 is a 422 (gRPC: INVALID_ARGUMENT)."""
    paths = [f"samples/images/{n}.jpg" for n in ("circle", "square", "triangle")]
    every = predict(client, demo_url, "image", paths).json()["predictions"]
    assert min(len(p["scores"]) for p in every) >= 3
    body = {"model_id": "image", "input_data": paths, "parameters": {"top_k": 2}}
    top = client.post(f"{demo_url}/predict", json=body).json()["predictions"]
    assert [p["scores"] for p in top] == [p["scores"][:2] for p in every]
    assert [p["label"] for p in top] == [p["label"] for p in every]

    images = [base64.b64encode((PROJECT_ROOT / p).read_bytes()).decode() for p in paths]
    rest = client.post(
        f"{demo_url}/v2/models/image/infer",
        json={
            "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": images}],
            "parameters": {"top_k": 1},
        },
    )
    assert rest.status_code == 200, rest.text
    assert rest.json()["outputs"][0]["data"] == [p["label"] for p in every]

    tensor = triton.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([(PROJECT_ROOT / p).read_bytes() for p in paths], dtype=object))
    result = grpc_client.infer("image", [tensor], parameters={"top_k": 1}, headers=DEMO)
    assert [label.decode() for label in result.as_numpy("label")] == [p["label"] for p in every]

    bad = client.post(f"{demo_url}/predict", json={**body, "parameters": {"top_k": 0}})
    assert bad.status_code == 422 and "parameters.top_k" in bad.json()["message"], bad.text
    with pytest.raises(InferenceServerException, match=r"parameters\.top_k"):
        grpc_client.infer("image", [tensor], parameters={"top_k": 0}, headers=DEMO)


# -- bad inputs, per task ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, input_data, status, message",
    [
        ("embed", "data:image/png;base64,iVBORw0KGgo=", 422, "takes text"),
        ("embed", "x" * 20_001, 422, "longer than the limit of 20000"),
        ("ner", ["ok"] * 33, 422, "longer than the limit of 32"),
        ("image-embed", "This model takes no text!", 422, "takes an image"),
        ("image-embed", "VGhpcyBpcyBub3QgYW4gaW1hZ2U=", 400, "not a readable image"),
        ("image-embed", "samples/images/missing.jpg", 422, "no image file"),
    ],
)
def test_bad_inputs_get_a_clear_4xx_for_each_task(client, demo_url, model, input_data, status, message):
    r = predict(client, demo_url, model, input_data)
    assert r.status_code == status and message in r.json()["message"], r.text
    assert "0x" not in r.text  # no object address from a decoder


def test_bad_v2_inputs_for_each_task_over_rest_and_grpc(client, demo_url, grpc_client):
    for model in ("embed", "ner", "image-embed"):
        body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        r = client.post(f"{demo_url}/v2/models/{model}/infer", json=body)
        assert r.status_code == 422 and "must be BYTES" in r.json()["error"]
        tensor = triton.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            grpc_client.infer(model, [tensor], headers=DEMO)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "must be BYTES" in e.value.message()


# -- a task module of one's own, and runtimes of one's own -------------------------------------------------


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """The folder of the models of the app of one's own tasks and runtimes (``tasks_url``)."""
    return tmp_path_factory.mktemp("own")


@pytest.fixture(scope="module")
def tasks_url(deploy, tiny_dir, own_models):
    base = own_models
    tickets = write_training_data(base / "tickets", KEYWORDS)
    clip = build_clip_model(base / "clip", tokenizer_of=tiny_dir / "alpha")
    prompted = build_sentence_model(base / "prompted", tiny_dir / "alpha", PROMPTS)
    own = "tests.byo_runtimes"

    def entry(model_id, task="text-classification", path=base, **extra):
        return {"id": model_id, "task": task, "source": {"path": str(path)}, **extra}

    models = [
        entry("tickets", path=tickets, runtime=f"{own}:TfidfClassifier", parameters={"delay_s": 0.3}),
        entry("stats", task="text-statistics"),
        entry("faulty", task="faulty-statistics"),
        entry("alpha", path=tiny_dir / "alpha", labels=labels_for("alpha")),
        entry("no-license", runtime=f"{own}:FailsToLoad"),
        entry("no-license-nor-unload", runtime=f"{own}:FailsToLoadAndToUnload"),
        entry("exits", runtime=f"{own}:ExitsOnLoad"),
        entry("ghost", path=base / "no-such-model"),
        entry("misspelt", task="feature-extraction", path=prompted, parameters={"normalise": True}),
        entry("unprepared", runtime=f"{own}:FailsToPrepare"),
        entry("wrong", runtime=f"{own}:BreaksItsContract"),
        entry("noisy", runtime=f"{own}:FailsNoisily"),
        entry("plain", runtime=f"{own}:NotARuntime"),
        entry("async", runtime=f"{own}:AsyncPredict"),
        entry("missing", runtime=f"{own}:Missing"),
        entry("clip-text", task="feature-extraction", path=clip),
        entry("clip-image", task="image-feature-extraction", path=clip),
        entry("prompted", task="feature-extraction", path=prompted),
        entry("prompted-query", task="feature-extraction", path=prompted, parameters={"prompt_name": "query"}),
    ]
    registry = base / "registry.json"
    registry.write_text(json.dumps({"models": models}))
    args = {
        "registry_path": str(registry),
        "auth": {"mode": "off"},
        "model_roots": MODEL_ROOTS,
        "tasks": [*SHIPPED_TASKS, "tests.text_stats_task", "tests.faulty_task"],
        "runtime_modules": [own],
        "worker": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 8, "torch_threads": 1},
    }
    return deploy("tasks", args)


def test_a_task_module_from_the_tests_directory_is_served_over_every_protocol(client, tasks_url, grpc_client):
    r = predict(client, tasks_url, "stats", ["two words", "one"])
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model_id": "stats",
        "task": "text-statistics",
        "predictions": [{"chars": 9, "words": 2}, {"chars": 3, "words": 1}],
    }
    meta = client.get(f"{tasks_url}/v2/models/stats").json()
    assert meta["platform"] == "python/text-statistics"
    assert meta["outputs"] == [
        {"name": "chars", "datatype": "INT64", "shape": [-1]},
        {"name": "words", "datatype": "INT64", "shape": [-1]},
    ]
    body = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a b c"]}],
        "outputs": [{"name": "words"}],
    }
    rest = client.post(f"{tasks_url}/v2/models/stats/infer", json=body).json()
    assert rest["outputs"] == [{"name": "words", "shape": [1], "datatype": "INT64", "data": [3]}]
    result = grpc_client.infer("stats", [text_input("four words right here")], headers=TASKS)
    assert result.as_numpy("words").tolist() == [4] and result.as_numpy("chars").tolist() == [21]
    listed = {m["id"]: m for m in client.get(f"{tasks_url}/models").json()["models"]}
    assert (
        listed["stats"]["task"] == "text-statistics"
        and listed["stats"]["runtime"] == "tests.text_stats_task:CountingRuntime"
    )


def test_a_runtime_of_ones_own_is_served_batched_and_evicted_like_any_other(client, tasks_url):
    texts = ["I was charged twice", "where is my parcel"] * 4
    answers: list = [None] * len(texts)

    def send(i):
        with httpx.Client(timeout=120) as c:
            answers[i] = predict(c, tasks_url, "tickets", texts[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.json()["predictions"][0]["label"] for a in answers] == ["billing", "shipping"] * 4
    # Requests that waited for the first 0.3 s batch ran together (the listing shows it at the next report).
    assert wait_for(lambda: client.get(f"{tasks_url}/models").json()["replicas"][0]["counters"]["largest_batch"] > 1)
    listed = {m["id"]: m for m in client.get(f"{tasks_url}/models").json()["models"]}
    assert (
        listed["tickets"]["runtime"] == "tests.byo_runtimes:TfidfClassifier" and listed["tickets"]["state"] == "loaded"
    )

    for model_id in ("stats", "alpha"):  # two more models on a replica of two: the LRU evicts tickets
        assert predict(client, tasks_url, model_id, "hello").status_code == 200
    assert wait_for(lambda: client.get(f"{tasks_url}/models/tickets").json()["state"] == "not_loaded")
    assert client.get(f"{tasks_url}/models/tickets").json()["unload_count"] >= 1
    assert predict(client, tasks_url, "tickets", "refund the payment").json()["predictions"][0]["label"] == "billing"
    assert client.get(f"{tasks_url}/models/tickets").json()["load_count"] >= 2


@pytest.mark.parametrize(
    "model_id, reason",
    [
        ("no-license", "RuntimeError: the license server did not answer"),
        ("no-license-nor-unload", "RuntimeError: the license server did not answer"),
        ("exits", "load() raised SystemExit: 2"),  # not the replica's end: the model after it is served
        ("ghost", "no model files at"),  # not transformers' "Repo id must be in the form ..."
        ("misspelt", "reads no registry parameter 'normalise'"),
        ("plain", "is not a subclass of deployments.runtimes.ModelRuntime"),
        ("async", "tests.byo_runtimes:AsyncPredict.predict is an async def"),
        ("missing", "module 'tests.byo_runtimes' has no class 'Missing'"),
    ],
)
def test_a_runtime_that_fails_to_load_is_a_503_with_its_reason_and_shows_failed(
    client, tasks_url, grpc_client, model_id, reason
):
    r = predict(client, tasks_url, model_id, "hello")
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable" and reason in r.json()["message"], r.text
    status = client.get(f"{tasks_url}/models/{model_id}").json()
    assert status["state"] == "failed" and reason in status["last_error"]
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer(model_id, [text_input("hello")], headers=TASKS)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and reason in e.value.message()
    assert predict(client, tasks_url, "stats", "still served").status_code == 200


def test_a_task_whose_own_code_fails_is_a_503_naming_the_task_and_the_step_never_a_500(client, tasks_url, grpc_client):
    """A task module's output kind is its own code, as a runtime is a model's (tests/faulty_task.py)."""
    failed = "Model 'faulty': its task 'faulty-statistics' failed to"
    r = predict(client, tasks_url, "faulty", NATIVE_FAILS)  # in the ingress
    assert (r.status_code, r.json()["error"]) == (503, "model_unavailable"), r.text
    assert (
        r.json()["message"]
        == f"{failed} shape its answer for the native API: RuntimeError: no native form for this answer"
    )
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [NATIVE_FAILS]}]}
    assert client.post(f"{tasks_url}/v2/models/faulty/infer", json=v2).status_code == 200  # v2 reads no native form
    r = predict(client, tasks_url, "faulty", ENCODE_FAILS)  # in the worker replica
    assert (r.status_code, r.json()["error"]) == (503, "model_unavailable"), r.text
    assert r.json()["message"] == f"{failed} encode its answer: KeyError: 'chars'"
    assert predict(client, tasks_url, "faulty", "two words").json()["predictions"] == [{"chars": 9, "words": 2}]
    # An answer no protocol could write: before, a serializer failed after the model had answered (a 500).
    r = predict(client, tasks_url, "faulty", NUMPY_NATIVE)  # numpy numbers in its native form
    assert (r.status_code, r.json()["error"]) == (503, "model_unavailable"), r.text
    assert r.json()["message"].startswith(f"{failed} shape its answer for the native API: ValueError: native answered")
    floats = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [FLOAT_COUNTS]}]}
    r = client.post(f"{tasks_url}/v2/models/faulty/infer", json=floats)  # FP64 tensors, declared INT64
    declared = "v2 output 'chars' is FP64; the model metadata declares INT64"
    assert r.status_code == 503 and r.json()["error"].endswith(declared), r.text
    with pytest.raises(InferenceServerException) as e:
        grpc_client.infer("faulty", [text_input(FLOAT_COUNTS)], headers=TASKS)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and declared in e.value.message()
    assert predict(client, tasks_url, "faulty", FLOAT_COUNTS).json()["predictions"] == [{"chars": 28.0, "words": 5.0}]


def test_a_traceback_in_a_replicas_log_reads_as_python_prints_it(client, tasks_url):
    """Serve's print in a replica passed a print to a file as one tuple, and logging formats a traceback that way
    (ray_internals.print_to_files_as_print_does): the worker logs the traceback of a runtime's failed unload."""
    from serve_app.core import ray_internals

    assert predict(client, tasks_url, "no-license-nor-unload", "hello").status_code == 503  # a load, then an unload

    def worker_log() -> str:
        logs = (ray_internals.logs_dir() / "serve").glob("replica_tasks_ModelWorker_*.log")
        return "".join(path.read_text(errors="replace") for path in logs)

    unload = "unloading model 'no-license-nor-unload' raised; its runtime is dropped\n"
    assert wait_for(lambda: unload in worker_log())
    trace = worker_log().split(unload, 1)[1]
    assert trace.startswith("Traceback (most recent call last):\n  File "), trace[:300]
    assert "AttributeError: 'FailsToLoadAndToUnload' object has no attribute 'model'" in trace.split("\n\n")[0]


def test_a_runtime_that_fails_on_its_input_is_a_503_naming_the_failure_without_addresses(client, tasks_url):
    # The model's own exception names the failure; what it says goes to the client without an object's address
    # (Pillow's and numpy's say "<... at 0x7f...>") and bounded; the log has all of it.
    r = predict(client, tasks_url, "noisy", "hello")
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable", r.text[:300]
    message = r.json()["message"]
    assert message.startswith("Model 'noisy' failed on this input: RuntimeError: cannot handle")
    assert " at 0x" not in message and len(message) < 320, message


def test_a_runtime_whose_prepare_fails_is_a_503_naming_the_failure(client, tasks_url):
    r = predict(client, tasks_url, "unprepared", "hello")
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable", r.text[:300]
    assert r.json()["message"] == (
        "Model 'unprepared' failed to prepare this input: ValueError: no tokenizer for this language"
    )


def test_a_runtime_that_answers_outside_its_tasks_contract_is_a_503_naming_it(client, tasks_url):
    before = client.get(f"{tasks_url}/models/wrong").json()["request_failures"]
    r = predict(client, tasks_url, "wrong", "hello")
    assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
    assert (
        "answered outside the text-classification contract: a classification row is label scores" in r.json()["message"]
    )
    # It loaded, and its requests fail: the listing says so, with what the client read.
    listed = lambda: client.get(f"{tasks_url}/models/wrong").json()  # noqa: E731
    assert wait_for(lambda: listed()["request_failures"] == before + 1), listed()
    assert listed()["state"] == "loaded" and listed()["last_request_error"] == r.json()["message"]


def test_one_clip_folder_serves_texts_and_images_in_one_space_for_text_to_image_search(client, tasks_url, own_models):
    """A CLIP model registered under both embedding tasks: a query's text vector and the images' vectors
    come from its two towers, of one size, as CLIP computes them."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    assert client.get(f"{tasks_url}/models/clip-text").json()["task"] == "feature-extraction"
    image = (IMAGES / "square.jpg").read_bytes()
    text = predict(client, tasks_url, "clip-text", ["a free iphone"])
    pictures = predict(client, tasks_url, "clip-image", [base64.b64encode(image).decode()])
    assert text.status_code == pictures.status_code == 200, (text.text, pictures.text)
    (query,), (picture,) = (np.array([p["embedding"] for p in r.json()["predictions"]]) for r in (text, pictures))
    assert query.shape == picture.shape == (12,)

    folder = own_models / "clip"
    model, tokenizer = CLIPModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        encoded = tokenizer(["a free iphone"], return_tensors="pt")
        want_text = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    np.testing.assert_allclose(query, want_text.pooler_output[0].numpy(), atol=1e-5)
    assert np.isfinite(picture).all() and np.abs(picture).sum() > 0  # the image tower's values: the unit tests


def test_a_request_chooses_among_a_sentence_models_prompts_over_every_protocol(client, tasks_url, grpc_client):
    """One copy of a model with a query and a passage prompt serves both: a request's prompt_name does what
    an entry's does (tests/unit/test_runtimes.py holds both to sentence-transformers' encode), over the
    native API, v2 REST and gRPC; requests with other prompts in one batch each get their own; a prompt the
    model has not, or a parameter its task does not take, is the request's 422."""
    import asyncio

    texts = ["this movie was great", "win a free iphone now"]

    def vectors(model_id, **parameters):
        body = {"model_id": model_id, "input_data": texts, **({"parameters": parameters} if parameters else {})}
        r = client.post(f"{tasks_url}/predict", json=body)
        assert r.status_code == 200, r.text
        return np.array([p["embedding"] for p in r.json()["predictions"]], dtype=np.float32)

    plain, query, passage = (
        vectors("prompted"),
        vectors("prompted", prompt_name="query"),
        vectors("prompted", prompt_name="passage"),
    )
    np.testing.assert_allclose(query, vectors("prompted-query"), atol=1e-5)  # as the entry's prompt
    assert not np.allclose(plain, query, atol=1e-3) and not np.allclose(query, passage, atol=1e-3)

    infer = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    rest = client.post(
        f"{tasks_url}/v2/models/prompted/infer",
        json={**infer, "parameters": {"prompt_name": "query", "timeout": 10**7}},
    )
    assert rest.status_code == 200, rest.text
    np.testing.assert_allclose(np.array(rest.json()["outputs"][0]["data"]).reshape(2, -1), query, atol=1e-5)
    result = grpc_client.infer("prompted", [text_input(*texts)], parameters={"prompt_name": "passage"}, headers=TASKS)
    np.testing.assert_allclose(result.as_numpy("embedding"), passage, atol=1e-5)

    async def together():
        async with httpx.AsyncClient(timeout=120) as c:
            bodies = [
                {"model_id": "prompted", "input_data": texts, "parameters": {"prompt_name": name}}
                for name in ["query", "passage", "query", "passage", "query", "passage"]
            ]
            return await asyncio.gather(*(c.post(f"{tasks_url}/predict", json=b) for b in bodies))

    for i, r in enumerate(asyncio.run(together())):
        got = np.array([p["embedding"] for p in r.json()["predictions"]], dtype=np.float32)
        np.testing.assert_allclose(got, query if i % 2 == 0 else passage, atol=1e-5)

    unknown = client.post(
        f"{tasks_url}/predict", json={"model_id": "prompted", "input_data": "x", "parameters": {"prompt_name": "title"}}
    )
    assert unknown.status_code == 422 and "has no prompt 'title' (its prompts: 'query', 'passage')" in unknown.text
    other = client.post(
        f"{tasks_url}/predict", json={"model_id": "alpha", "input_data": "x", "parameters": {"prompt_name": "query"}}
    )
    assert other.status_code == 422 and other.json()["error"] == "invalid_input", other.text
    assert "a model of task text-classification takes no such parameter" in other.json()["message"]
