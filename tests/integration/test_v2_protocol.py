"""The Open Inference Protocol (KServe v2) on the same ingress, driven by Triton's standard client."""

import base64

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serve_app.core.paths import PROJECT_ROOT
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def v2(demo_url):
    host = demo_url.removeprefix("http://")
    assert "/" not in host, "the v2 client needs the app at the root path"
    c = triton.InferenceServerClient(url=host, connection_timeout=120, network_timeout=120)
    yield c
    c.close()


def _labels(result, name="label"):
    return [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy(name).tolist()]


def test_server_health_and_metadata(v2):
    assert v2.is_server_live()
    assert v2.is_server_ready()
    meta = v2.get_server_metadata()
    assert meta["name"] == "multimodel-serve" and "model_repository" in meta["extensions"]


def test_model_metadata(v2):
    meta = v2.get_model_metadata("sentiment")
    assert meta["name"] == "sentiment"
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"] for o in meta["outputs"]} == {"label", "score"}


@pytest.mark.parametrize("binary", [True, False])
def test_text_inference_with_the_standard_client(v2, binary):
    texts = np.array([b"This movie was great!", b"Dreadful film, a total waste of time."], dtype=np.object_)
    inp = triton.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=binary)
    result = v2.infer(
        "sentiment",
        [inp],
        request_id="req-42",
        outputs=[
            triton.InferRequestedOutput("label", binary_data=False),
            triton.InferRequestedOutput("score", binary_data=False),
        ],
    )
    assert _labels(result) == ["positive", "negative"]
    scores = result.as_numpy("score")
    assert scores.shape == (2,) and (scores > 0.5).all()
    response = result.get_response()
    assert response["model_name"] == "sentiment" and response["id"] == "req-42"


def test_an_output_asked_of_a_triton_extension_this_server_lacks_is_422_not_ignored(v2):
    """tritonclient's ``class_count`` asks for Triton's classification extension (the top classes as strings);
    answered as if not asked, the client got the top label where it expected two."""
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"This movie was great!"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        v2.infer("sentiment", [inp], outputs=[triton.InferRequestedOutput("label", class_count=2)])
    assert e.value.status() == "422" and "parameter 'classification' is not supported" in e.value.message()


def test_image_inference_with_encoded_bytes(v2):
    raw = (PROJECT_ROOT / "samples/images/triangle.jpg").read_bytes()
    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
    result = v2.infer("image", [inp], outputs=[triton.InferRequestedOutput("label", binary_data=False)])
    assert _labels(result) == ["triangle"]


def test_errors_have_the_protocol_shape(v2, demo_url, client):
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="Unknown model 'nope'"):
        v2.infer("nope", [inp])
    r = client.post(
        f"{demo_url}/v2/models/sentiment/infer",
        json={"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
    )
    assert r.status_code == 422 and set(r.json()) == {"error"} and "BYTES" in r.json()["error"]
    r = client.post(f"{demo_url}/v2/models/sentiment/infer", json={"inputs": []})
    assert r.status_code == 422 and set(r.json()) == {"error"}
    # An empty text, in JSON or in binary form, as the native API refuses it (the native 422 names the model).
    empty = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hi", ""]}]}
    r = client.post(f"{demo_url}/v2/models/sentiment/infer", json=empty)
    assert r.status_code == 422 and r.json() == {"error": "input_data[1]: an empty text (send at least one character)"}
    inp.set_data_from_numpy(np.array([b""], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"input_data\[0\]: an empty text"):
        v2.infer("sentiment", [inp])


@pytest.mark.parametrize(
    "shape, data",
    [([-7, 99999999999], ["hi"]), ([2], ["hi"]), ([1, 2], ["a", "b", "c"]), ([], ["a", "b"])],
)
def test_a_shape_that_disagrees_with_its_data_is_400(demo_url, client, shape, data):
    body = {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": data}]}
    r = client.post(f"{demo_url}/v2/models/sentiment/infer", json=body)
    assert r.status_code == 400 and "shape" in r.json()["error"], r.text
    body["inputs"][0]["shape"] = [len(data)]
    assert client.post(f"{demo_url}/v2/models/sentiment/infer", json=body).status_code == 200


def _states(v2, demo_url, client) -> tuple[dict, dict]:
    """Each model's state in the repository index, and in GET /models as the protocol names it."""
    protocol = {"loaded": "READY", "loading": "LOADING", "not_loaded": "UNAVAILABLE", "failed": "FAILED"}
    index = {m["name"]: m["state"] for m in v2.get_model_repository_index()}
    native = {m["id"]: protocol[m["state"]] for m in client.get(f"{demo_url}/models").json()["models"]}
    return index, native


def test_model_repository_extension(v2, demo_url, client):
    index, native = _states(v2, demo_url, client)
    assert set(index) == {"sentiment", "spam", "image", "embed", "ner", "image-embed"}
    assert index == native  # the index reports what the replicas report

    v2.load_model("spam")
    assert v2.is_model_ready("spam")
    holders = client.get(f"{demo_url}/models/spam").json()["replicas"]
    assert holders and {r["replica_id"] for r in client.get(f"{demo_url}/models").json()["replicas"]} >= set(holders)
    index, native = _states(v2, demo_url, client)
    assert index["spam"] == "READY" and index == native
    ready_index = client.post(f"{demo_url}/v2/repository/index", json={"ready": True}).json()
    assert "spam" in {m["name"] for m in ready_index} and {m["state"] for m in ready_index} == {"READY"}
    refused = client.post(f"{demo_url}/v2/repository/index", json={"ready": "maybe"})
    assert refused.status_code == 422 and "ready" in refused.json()["error"]

    v2.unload_model("spam")
    assert wait_for(lambda: not v2.is_model_ready("spam"))
    assert {m["name"]: m for m in v2.get_model_repository_index()}["spam"]["state"] == "UNAVAILABLE"
    assert wait_for(lambda: all("spam" not in r["models"] for r in client.get(f"{demo_url}/models").json()["replicas"]))
    # The protocol's {"ready": true} lists the ready models only (spam among them while it was loaded, above),
    # as the gRPC index's ready flag does.
    ready = client.post(f"{demo_url}/v2/repository/index", json={"ready": True}).json()
    assert "spam" not in {m["name"] for m in ready} and {m["state"] for m in ready} <= {"READY"}
    assert "spam" in {m["name"] for m in client.post(f"{demo_url}/v2/repository/index").json()}


def test_image_inference_with_base64_in_json(demo_url, client):
    raw = (PROJECT_ROOT / "samples/images/triangle.jpg").read_bytes()
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(raw).decode()]}]}
    r = client.post(f"{demo_url}/v2/models/image/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"] == {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["triangle"]}
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["data"][0] > 0.5


def test_versioned_routes_answer_as_the_unversioned_ones(demo_url, client):
    base = f"{demo_url}/v2/models/sentiment"
    assert client.get(f"{base}/versions/1").json() == client.get(base).json()
    assert client.get(f"{base}/versions/1/ready").status_code == client.get(f"{base}/ready").status_code
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["This movie was great!"]}]}
    r = client.post(f"{base}/versions/1/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["positive"]


def test_the_standard_clients_timeout_is_the_requests_deadline(v2, demo_url, client):
    """tritonclient's ``timeout`` (microseconds) reaches the server as the request's deadline: 1 us on a model
    that is not loaded is a 504 in the protocol's shape."""
    client.post(f"{demo_url}/models/spam/unload")
    assert wait_for(lambda: not client.get(f"{demo_url}/models/spam").json()["loaded"])
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"Win a free iPhone now!"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"did not answer within 1e-06s") as e:
        v2.infer("spam", [inp], timeout=1)
    assert e.value.status() == "504"
