"""A per-request timeout: 504, the work on the replica is cancelled, and the app keeps answering."""

import pytest

from tests.helpers import tiny_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_url(deploy, tiny_registry):
    from ray import serve

    # A timeout far shorter than any model load: every cold prediction runs out of time.
    yield deploy("slow", tiny_args(tiny_registry, replicas=1, request_timeout_s=0.01))
    serve.delete("slow")


def test_a_prediction_over_the_timeout_is_504(client, slow_url):
    r = client.post(f"{slow_url}/predict", json={"model_id": "alpha", "input_data": "hello"})
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["error"] == "timeout"
    assert "alpha" in body["message"] and "0.01s" in body["message"]


def test_the_app_still_answers_after_timeouts(client, slow_url):
    for _ in range(3):
        assert client.post(f"{slow_url}/predict", json={"model_id": "beta", "input_data": "hi"}).status_code == 504
    assert client.get(f"{slow_url}/healthz").status_code == 200
    assert client.get(f"{slow_url}/readyz").status_code == 200
    assert client.get(f"{slow_url}/models").status_code == 200
