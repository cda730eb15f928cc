"""The curl examples of the single-process demo this app grows from, against the real app over HTTP."""

import base64

import pytest

from serve_app.core.paths import PROJECT_ROOT
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def predict(client, url, model_id, input_data):
    return client.post(f"{url}/predict", json={"model_id": model_id, "input_data": input_data})


def test_list_models(client, demo_url):
    r = client.get(f"{demo_url}/models")
    assert r.status_code == 200
    models = {m["id"]: m for m in r.json()["models"]}
    assert set(models) == {"sentiment", "spam", "image", "embed", "ner", "image-embed"}
    assert models["sentiment"]["task"] == "text-classification"
    assert models["image"]["input_modality"] == "image"
    assert models["spam"]["labels"] == ["ham", "spam"]
    assert models["image"]["source"] == "models/image"
    assert all(isinstance(m["loaded"], bool) and m["description"] for m in models.values())


def test_sentiment_example(client, demo_url):
    r = predict(client, demo_url, "sentiment", "This movie was great!")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "sentiment"
    assert body["predictions"][0]["label"] == "positive"
    assert body["predictions"][0]["score"] > 0.5
    assert {s["label"] for s in body["predictions"][0]["scores"]} == {"positive", "negative"}


def test_spam_example(client, demo_url):
    r = predict(client, demo_url, "spam", "Win a free iPhone now!")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "spam" and body["task"] == "text-classification"
    (prediction,) = body["predictions"]
    assert prediction["label"] == "spam" and prediction["score"] > 0.5
    assert prediction["scores"][0]["label"] == "spam"
    assert sum(s["score"] for s in prediction["scores"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "name, shape",
    [("image.jpg", "circle"), ("circle.jpg", "circle"), ("square.jpg", "square"), ("triangle.jpg", "triangle")],
)
def test_image_example_with_a_path(client, demo_url, name, shape):
    r = predict(client, demo_url, "image", f"samples/images/{name}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "image" and body["task"] == "image-classification"
    assert body["predictions"][0]["label"] == shape
    assert {s["label"] for s in body["predictions"][0]["scores"]} == {"circle", "square", "triangle"}


def test_image_as_base64_and_data_uri(client, demo_url):
    b64 = base64.b64encode((PROJECT_ROOT / "samples/images/triangle.jpg").read_bytes()).decode()
    for form in (b64, f"data:image/jpeg;base64,{b64}"):
        r = predict(client, demo_url, "image", form)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == "triangle"


def test_text_list_gets_one_prediction_per_input_in_order(client, demo_url):
    texts = ["I loved this film, wonderful acting.", "Awful, boring and far too long.", "Great fun!"]
    r = predict(client, demo_url, "sentiment", texts)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == ["positive", "negative", "positive"]


def test_models_shows_what_is_loaded(client, demo_url):
    assert predict(client, demo_url, "spam", "See you at lunch tomorrow").status_code == 200

    def spam_loaded():
        m = client.get(f"{demo_url}/models/spam").json()
        return m["loaded"] and len(m["replicas"]) >= 1

    assert wait_for(spam_loaded)
    holders = client.get(f"{demo_url}/models/spam").json()["replicas"]
    listing = client.get(f"{demo_url}/models").json()
    assert sorted(r["replica_id"] for r in listing["replicas"] if "spam" in r["models"]) == sorted(holders)

    def every_running_replica_listed() -> bool:  # Serve's count of running worker replicas
        running = client.get(f"{demo_url}/readyz").json()["worker_replicas"]
        return len(client.get(f"{demo_url}/models").json()["replicas"]) == running

    assert wait_for(every_running_replica_listed)


def test_unknown_model_is_a_404_listing_known_ids(client, demo_url):
    r = predict(client, demo_url, "no-such-model", "hello")
    assert r.status_code == 404
    body = r.json()
    assert body["error"] == "model_not_found"
    assert set(body["known_models"]) == {"sentiment", "spam", "image", "embed", "ner", "image-embed"}
    assert "sentiment" in body["message"]
    assert client.get(f"{demo_url}/models/no-such-model").status_code == 404


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input_data": "x"}, "model_id"),
        ({"model_id": "spam"}, "input_data"),
        ({"model_id": "spam", "input_data": 3}, "input_data"),
    ],
)
def test_bad_request_is_a_422_naming_the_field(client, demo_url, body, field):
    r = client.post(f"{demo_url}/predict", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"
    assert r.json()["message"].startswith(field) and all(p["field"].startswith(field) for p in r.json()["problems"])


def test_text_to_an_image_model_is_a_422(client, demo_url):
    r = predict(client, demo_url, "image", "This movie was great!")
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_input"
    assert r.json()["message"].startswith("input_data[0]: this model takes an image")


def test_path_outside_the_image_root_is_a_403(client, demo_url):
    r = predict(client, demo_url, "image", "samples/images/../../config/../../etc/passwd.png")
    assert r.status_code == 403
    assert r.json() == {
        "error": "forbidden_path",
        "message": "input_data[0]: image paths must lie under the image root (image_root)",
        "model_id": "image",
    }


def test_openapi_docs(client, demo_url):
    assert client.get(f"{demo_url}/docs").status_code == 200
    spec = client.get(f"{demo_url}/openapi.json").json()
    assert {"/predict", "/models", "/models/{model_id}"} <= set(spec["paths"])
