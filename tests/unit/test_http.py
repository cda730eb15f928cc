"""The HTTP layer without Ray: the ingress's own FastAPI app (``api`` in deployments/ingress/deployment.py),
its middleware, error handlers and routes as the ingress replica serves them, with the settings a replica
sets at start and a stand-in for the replica behind the routes (its data plane answers as each test says).
"""

import contextlib
import json
import struct
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.ingress.dataplane import merge_model_status
from deployments.ingress.deployment import api
from deployments.ingress.middleware import BodyLimitMiddleware
from serve_app.core.config import Keys
from serve_app.core.errors import BadImage, InvalidInput, ModelNotFound, ModelUnavailable
from serve_app.core.registry import ModelSpec
from tests.helpers import inference_result

SPEC = ModelSpec(id="ok", task="text-classification", source={"path": "models/ok"})


class Plane:
    """The data plane behind the routes: a model id says how it answers."""

    def __init__(self) -> None:
        self.inferred: list[str] = []
        self.parsing: list[str] = []

    async def parsed(self, api, parse):  # the real one counts a body that cannot be read in the metrics
        self.parsing.append(api)
        return await parse

    async def infer(self, model_id, request, api):
        self.inferred.append(model_id)
        if model_id == "missing":
            raise ModelNotFound("missing", ["a", "b"])
        if model_id == "crash":
            raise RuntimeError("secret detail /srv/models")
        if model_id == "image":
            raise BadImage("input_data[0]: not a readable image")
        if model_id == "odd-details":  # a runtime's own error, with details JSON cannot hold
            raise InvalidInput("input 3 is too long", index=np.int64(3), score=float("nan"), ok=[1, "a"])
        if model_id == "backoff":
            raise ModelUnavailable("Model 'backoff' could not be loaded (not tried again for 3s)", retry_after_s=2.4)
        if model_id not in ("ok", "many"):
            raise ModelUnavailable(f"Model {model_id!r} could not be loaded", model_id=model_id)
        if callable(request):  # a protocol's parser, called once the model is known (v2)
            await request()
        if model_id == "many":  # 20 inputs of 1,001 labels each: 40,040 elements
            return inference_result(SPEC, [[(f"l{j}", j / 1001) for j in range(1001)] for _ in range(20)])
        return inference_result(SPEC, [[("ok-label", 1.0)]])

    def spec(self, model_id):
        if model_id != "ok":
            raise ModelNotFound(model_id, ["ok"])
        return SPEC

    def task(self, spec):
        from serve_app.core.tasks import TaskCatalog

        return TaskCatalog.load().task_of(spec)

    async def load(self, model_id):
        return merge_model_status(SPEC, [])

    async def unload(self, model_id):
        return merge_model_status(SPEC, [])


@contextlib.contextmanager
def ingress_api(
    api_key: bytes | None = None, admin_key: bytes | None = None, max_body_bytes: int = 100
) -> Iterator[tuple[TestClient, Plane]]:
    """A client of the ingress's ``api`` as a replica serves it (``Ingress.__init__`` sets the keys and the body
    limit on ``api.state``; Serve hands each route its replica), and the data plane behind it."""
    plane = Plane()
    replica = SimpleNamespace(max_items=8, plane=plane, replica_id="ingress-test")
    with pytest.MonkeyPatch.context() as mp:
        from ray import serve

        mp.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))
        mp.setattr(api.state, "keys", Keys(api=api_key, admin=admin_key), raising=False)
        mp.setattr(api.state, "max_body_bytes", max_body_bytes, raising=False)
        yield TestClient(api, raise_server_exceptions=False), plane


@pytest.fixture
def client() -> Iterator[TestClient]:
    with ingress_api() as (c, _):
        yield c


def test_application_errors_map_to_their_status_and_body(client):
    r = client.post("/predict", json={"model_id": "missing", "input_data": "x"})
    assert r.status_code == 404
    assert r.json() == {
        "error": "model_not_found",
        "message": "Unknown model 'missing'. Known models: a, b",
        "model_id": "missing",
        "known_models": ["a", "b"],
    }
    r = client.post("/predict", json={"model_id": "image", "input_data": "x"})
    assert r.status_code == 400 and r.json()["error"] == "bad_image"


def test_under_v2_errors_have_the_protocol_shape(client):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    r = client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 503 and r.json() == {"error": "Model 'm' could not be loaded"}


def test_a_v2_answer_echoes_the_request_id_and_has_none_when_the_request_had_none(client):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    answer = client.post("/v2/models/ok/infer", json=body).json()
    assert "id" not in answer and answer["model_name"] == "ok" and answer["outputs"][0]["data"] == ["ok-label"]
    assert client.post("/v2/models/ok/infer", json={**body, "id": "r-1"}).json()["id"] == "r-1"


def test_body_validation_names_each_field(client):
    r = client.post("/predict", json={"model": "x"})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_request" and body["problems"][0]["field"] == "model_id"
    assert body["message"].startswith("model_id: ")


def test_an_unexpected_error_is_a_500_without_its_details(client):
    r = client.post("/predict", json={"model_id": "crash", "input_data": "x"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal error (RuntimeError)"}


def test_unknown_routes_and_methods_keep_the_shape(client):
    assert client.get("/nowhere").json()["error"] == "not_found"
    assert client.get("/predict").json()["error"] == "method_not_allowed"


def test_a_body_over_the_limit_is_413_by_its_length_or_as_it_streams_before_any_route_reads_it():
    with ingress_api(max_body_bytes=100) as (client, plane):
        r = client.post("/predict", content=b"x" * 101, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json() == {
            "error": "payload_too_large",
            "message": "the request body is larger than 100 bytes",
            "limit": 100,
        }
        for path in ("/predict", "/v2/models/ok/infer"):  # no Content-Length: counted as it streams in
            chunked = client.post(
                path, content=iter([b"x" * 60, b"x" * 60]), headers={"content-type": "application/json"}
            )
            assert chunked.status_code == 413, path
        assert chunked.json() == {"error": "the request body is larger than 100 bytes"}  # the v2 shape
        assert plane.inferred == []
        assert client.post("/predict", json={"model_id": "ok", "input_data": "x"}).status_code == 200


def test_the_api_key_guards_every_route_but_health():
    with ingress_api(api_key=b"s3cret", admin_key=b"admin-s3cret") as (client, plane):
        r = client.post("/predict", json={"model_id": "ok", "input_data": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "unauthorized"
        assert client.post("/v2/models/m/infer").json() == {
            "error": "missing or wrong API key: send 'Authorization: Bearer <key>'"
        }
        for path in ("/models", "/docs", "/openapi.json", "/v2"):
            assert client.get(path).status_code == 401, path
        body = {"model_id": "ok", "input_data": "x"}
        assert client.post("/predict", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert plane.inferred == []
        assert client.post("/predict", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/predict", json=body, headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/v2/health/live").status_code == 200


def test_the_key_is_checked_before_the_body_limit():
    """An unauthenticated caller learns nothing of the app, its limits included: auth runs first."""
    with ingress_api(api_key=b"s3cret", admin_key=b"admin-s3cret", max_body_bytes=100) as (client, _):
        r = client.post("/predict", content=b"x" * 101, headers={"content-type": "application/json"})
        assert r.status_code == 401


def test_load_and_unload_need_the_admin_key_which_also_opens_every_other_route():
    with ingress_api(api_key=b"s3cret", admin_key=b"admin-s3cret") as (client, _):
        user, admin_key = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer admin-s3cret"}
        for path in ["/models/ok/load", "/models/ok/unload", "/v2/repository/models/ok/unload"]:
            r = client.post(path, headers=user)
            assert r.status_code == 403, path
            body = r.json()
            if path.startswith("/v2"):  # the Open Inference Protocol's error shape
                assert set(body) == {"error"} and "needs the admin key" in body["error"]
            else:
                assert body["error"] == "admin_key_required" and "needs the admin key" in body["message"]
            assert client.post(path).status_code == 401
            assert client.post(path, headers=admin_key).status_code == 200, path
        assert client.post("/models/ok/load", headers=admin_key).json()["id"] == "ok"
        body = {"model_id": "ok", "input_data": "x"}
        assert client.post("/predict", json=body, headers=admin_key).status_code == 200


@pytest.mark.parametrize("char", ["%0A", "%0D", "%00", "%09", "%7F"])
def test_a_path_with_a_control_character_is_400_before_the_key_is_checked(char):
    """The router matches ``/models/ok/load%0A`` as the load route (a pattern's ``$`` matches before a final
    newline): were such a path let through, the API key would load and unload models."""
    with ingress_api(api_key=b"s3cret", admin_key=b"admin-s3cret") as (client, _):
        user = {"Authorization": "Bearer s3cret"}
        for path in ["/models/ok/load", "/models/ok/unload", "/v2/repository/models/ok/load", "/predict"]:
            variants = {path + char, path + "/" + char, path.replace("/ok/", f"/ok{char}/")} - {path}
            for variant in variants:
                r = client.post(variant, headers=user)
                assert r.status_code == 400, variant
                assert "control character" in json.dumps(r.json()), variant
        assert client.post("/models/ok/load", headers=user).status_code == 403


@pytest.mark.parametrize(
    ("root_path", "path"), [("/m", "/models/ok/load"), ("/m", "/m/models/ok/load"), ("", "/models/ok/load")]
)
def test_the_admin_check_reads_the_path_under_a_route_prefix_as_the_router_does(root_path, path):
    """Under the route prefix /m, the router reads /models/ok/load as the load route (a path that does not start
    with the prefix and a slash is taken whole): so must the admin check."""
    import asyncio

    from deployments.ingress.middleware import AuthMiddleware

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    state = SimpleNamespace(keys=Keys(api=b"s3cret", admin=b"admin-s3cret"))
    scope = {
        "type": "http",
        "path": path,
        "root_path": root_path,
        "headers": [(b"authorization", b"Bearer s3cret")],
        "app": SimpleNamespace(state=state),
    }
    asyncio.run(AuthMiddleware(app)(scope, None, send))
    assert reached == [] and sent[0]["status"] == 403


def test_two_authorization_headers_are_400_whichever_key_comes_last():
    """Which of two a proxy in front and the app would each read is not for the client to choose: the API key
    and then the admin key must not load a model, nor a wrong key and then the right one predict."""
    with ingress_api(api_key=b"s3cret", admin_key=b"admin-s3cret") as (client, plane):
        for first, last, path in [
            ("s3cret", "admin-s3cret", "/models/ok/load"),
            ("wrong", "s3cret", "/predict"),
            ("admin-s3cret", "s3cret", "/predict"),
        ]:
            headers = [("authorization", f"Bearer {first}"), ("authorization", f"Bearer {last}")]
            r = client.post(path, headers=headers, json={"model_id": "ok", "input_data": "x"})
            assert r.status_code == 400 and "2 Authorization headers" in r.json()["message"], (first, last)
        assert plane.inferred == []


def test_with_auth_off_every_route_is_open(client):
    assert client.post("/predict", json={"model_id": "ok", "input_data": "x"}).status_code == 200
    assert client.post("/models/ok/load").status_code == 200


def test_a_body_not_received_within_its_deadline_is_408_and_the_connection_closes():
    import asyncio

    read: list[bytes] = []

    async def read_body(scope, receive, send):  # the routes read the body to its end
        while True:
            message = await receive()
            read.append(message["body"])
            if not message.get("more_body"):
                return

    sent: list[dict] = []

    async def slow_receive():
        await asyncio.sleep(0.15)  # a byte every 0.15 s: each wait short, the whole past the deadline
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message):
        sent.append(message)

    state = SimpleNamespace(max_body_bytes=1000, body_timeout_s=0.5)
    scope = {"type": "http", "path": "/predict", "headers": [], "app": SimpleNamespace(state=state)}
    asyncio.run(BodyLimitMiddleware(read_body)(scope, slow_receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    body = next(m for m in sent if m["type"] == "http.response.body")["body"]
    assert json.loads(body)["error"] == "request_timeout"

    sent.clear()  # a body that arrives in time is read to its end by the route, and nothing else is sent
    read.clear()
    quick = iter([{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.request", "body": b"}"}])
    asyncio.run(BodyLimitMiddleware(read_body)(scope, lambda: asyncio.sleep(0, next(quick)), send))
    assert read == [b"{", b"}"] and sent == []


def test_a_model_in_its_back_off_is_503_with_retry_after(client):
    r = client.post("/predict", json={"model_id": "backoff", "input_data": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "3" and r.json()["retry_after_s"] == 2.4


def test_a_long_unknown_model_id_is_quoted_in_part():
    e = ModelNotFound("x" * 10_000, ["a"])
    assert e.details["model_id"] == "x" * 80 + "..." and len(e.message) < 120
    assert ModelNotFound("nope", ["a"]).body() == {
        "error": "model_not_found",
        "message": "Unknown model 'nope'. Known models: a",
        "model_id": "nope",
        "known_models": ["a"],
    }


def test_every_reference_of_the_openapi_document_resolves_and_the_bodies_are_described():
    """Swagger UI (/docs) renders the routes' bodies from /openapi.json: each ``$ref`` in it must point at
    a schema of the document, the request bodies that the routes parse themselves included."""
    with ingress_api() as (client, _):
        spec = client.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert "#/components/schemas/JsonValue" in found and "#/components/schemas/RequestInput" in found
    for ref in found:
        node = spec
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
    predict = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model_id", "input_data", "parameters"} <= set(predict["properties"]) and "$defs" not in predict


def test_a_v2_model_answers_at_its_one_version_and_another_version_is_404(client):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    assert client.post("/v2/models/ok/versions/1/infer", json=body).json()["model_version"] == "1"
    assert client.get("/v2/models/ok/versions/1").json()["versions"] == ["1"]
    for r in (client.post("/v2/models/ok/versions/2/infer", json=body), client.get("/v2/models/ok/versions/2")):
        assert r.status_code == 404 and r.json() == {"error": "Model 'ok' has no version '2'; its versions: 1"}
    assert client.get("/v2/models/nope/versions/1").status_code == 404  # an unknown model first


def test_a_v2_answer_with_binary_outputs_follows_its_json_with_their_bytes():
    body = {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
    }
    with ingress_api(max_body_bytes=1000) as (client, _):
        r = client.post("/v2/models/ok/infer", json=body)
    length = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:length])
    assert r.headers["content-type"] == "application/octet-stream"
    assert [(o["name"], o["parameters"]["binary_data_size"], "data" in o) for o in header["outputs"]] == [
        ("label", 12, False),
        ("score", 4, False),
    ]
    assert r.content[length:] == b"\x08\x00\x00\x00ok-label" + struct.pack("<f", 1.0)


def test_a_large_answer_is_shaped_off_the_event_loop_and_reads_as_a_small_one_does(monkeypatch):
    """An answer of more elements than OFF_LOOP_ELEMENTS is shaped and serialized on a thread (the event loop
    serves every other request meanwhile); a small one on the loop. Both are the JSON FastAPI would give."""
    import asyncio

    from deployments.ingress import deployment
    from deployments.ingress.protocols import native, v2

    on_loop = []

    def running_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    for module, name in ((native, "predict_response"), (v2, "infer_response")):
        shape = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, shape=shape: on_loop.append(running_loop()) or shape(*a))
    text = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    with ingress_api(max_body_bytes=1000) as (client, _):
        small = client.post("/predict", json={"model_id": "ok", "input_data": "x"})
        large = client.post("/predict", json={"model_id": "many", "input_data": "x"})
        large_v2 = client.post("/v2/models/many/infer", json={**text, "id": "r-1"})
        small_v2 = client.post("/v2/models/ok/infer", json=text)
    assert on_loop == [True, False, False, True]
    assert small.json()["predictions"] == [
        {"label": "ok-label", "score": 1.0, "scores": [{"label": "ok-label", "score": 1.0}]}
    ]
    predictions = large.json()["predictions"]
    assert large.headers["content-type"] == "application/json" and len(predictions) == 20
    assert predictions[0]["label"] == "l1000" and len(predictions[0]["scores"]) == 1001
    assert deployment.OFF_LOOP_ELEMENTS < 20 * 1001 * 2
    answer = large_v2.json()
    assert answer["id"] == "r-1" and [o["name"] for o in answer["outputs"]] == ["label", "score"]
    assert answer["outputs"][0]["data"] == ["l1000"] * 20 and "id" not in small_v2.json()


def test_a_predict_body_is_read_through_the_data_plane_which_counts_one_that_cannot_be():
    with ingress_api(max_body_bytes=1000) as (client, plane):
        assert client.post("/predict", content=b"{not json").status_code == 400
        assert client.post("/predict", json={"model_id": "ok", "input_data": "x"}).status_code == 200
    assert plane.parsing == ["native", "native"] and plane.inferred == ["ok"]


def test_an_error_whose_details_json_cannot_hold_is_answered_with_them_as_text(client):
    """A runtime's own error may carry any details (a numpy number, a NaN): the answer is its 4xx with those as
    text, not a 500 from the error handler."""
    r = client.post("/predict", json={"model_id": "odd-details", "input_data": "x"})
    assert r.status_code == 422
    assert r.json() == {
        "error": "invalid_input",
        "message": "input 3 is too long",
        "index": "3",
        "score": "nan",
        "ok": [1, "a"],
    }


@pytest.mark.parametrize("path", ["/predict", "/v2/models/a/infer"])
def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_server_error(path, caplog):
    """Content-Length promised more than came, then the connection closed: the route reading the body sees the
    disconnect. Nothing of the server failed: 499, and no error in the log (before: a 500 and two tracebacks
    for each such request)."""
    import asyncio
    import logging

    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b'{"model_id": "a', "more_body": True}])

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"60")],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
    }
    with ingress_api(max_body_bytes=1000), caplog.at_level(logging.ERROR):
        asyncio.run(api(scope, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
