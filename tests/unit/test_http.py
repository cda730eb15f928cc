"""The HTTP layer on its own: the error mapping and the middleware, on a small FastAPI app (no Ray)."""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from deployments.ingress.http_errors import install_error_handlers
from deployments.ingress.middleware import AuthMiddleware, BodyLimitMiddleware
from serve_app.core.config import Keys
from serve_app.core.errors import BadImage, ModelNotFound, ModelUnavailable


class Body(BaseModel):
    model_id: str


def make_app(api_key: bytes | None = None, max_body_bytes: int = 100, admin_key: bytes | None = None) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuthMiddleware)
    app.state.keys, app.state.max_body_bytes = Keys(api=api_key, admin=admin_key), max_body_bytes

    @app.post("/predict")
    async def predict(body: Body) -> dict:
        if body.model_id == "missing":
            raise ModelNotFound("missing", ["a", "b"])
        if body.model_id == "crash":
            raise RuntimeError("secret detail /srv/models")
        return {"ok": body.model_id}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str) -> dict:
        raise ModelUnavailable(f"Model {name!r} could not be loaded", model_id=name)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/image")
    async def image() -> dict:
        raise BadImage("input_data[0]: not a readable image")

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def test_application_errors_map_to_their_status_and_body(client):
    r = client.post("/predict", json={"model_id": "missing"})
    assert r.status_code == 404
    assert r.json() == {
        "error": "model_not_found",
        "message": "Unknown model 'missing'. Known models: a, b",
        "model_id": "missing",
        "known_models": ["a", "b"],
    }
    assert client.get("/image").json()["error"] == "bad_image" and client.get("/image").status_code == 400


def test_under_v2_errors_have_the_protocol_shape(client):
    r = client.post("/v2/models/m/infer")
    assert r.status_code == 503 and r.json() == {"error": "Model 'm' could not be loaded"}


def test_body_validation_names_each_field(client):
    r = client.post("/predict", json={"model": "x"})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_request" and body["problems"][0]["field"] == "model_id"
    assert body["message"].startswith("model_id: ")


def test_an_unexpected_error_is_a_500_without_its_details(client):
    r = client.post("/predict", json={"model_id": "crash"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal error (RuntimeError)"}


def test_unknown_routes_and_methods_keep_the_shape(client):
    assert client.get("/nowhere").json()["error"] == "not_found"
    assert client.get("/predict").json()["error"] == "method_not_allowed"


def test_a_body_over_the_limit_is_413_by_its_length_or_as_it_streams():
    client = TestClient(make_app(max_body_bytes=100))
    r = client.post("/predict", content=b"x" * 101, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {
        "error": "payload_too_large",
        "message": "the request body is larger than 100 bytes",
        "limit": 100,
    }
    chunked = client.post(
        "/predict", content=iter([b"x" * 60, b"x" * 60]), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413 and chunked.json()["limit"] == 100
    assert client.post("/predict", json={"model_id": "ok"}).status_code == 200


def test_the_api_key_guards_every_route_but_health():
    client = TestClient(make_app(api_key=b"s3cret", admin_key=b"admin-s3cret"))
    r = client.post("/predict", json={"model_id": "ok"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "unauthorized"
    assert client.post("/v2/models/m/infer").json() == {
        "error": "missing or wrong API key: send 'Authorization: Bearer <key>'"
    }
    assert (
        client.post("/predict", json={"model_id": "ok"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    assert (
        client.post("/predict", json={"model_id": "ok"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    )
    assert (
        client.post("/predict", json={"model_id": "ok"}, headers={"Authorization": "bearer s3cret"}).status_code == 200
    )
    assert client.get("/healthz").status_code == 200


def test_load_and_unload_need_the_admin_key_which_also_opens_every_other_route():
    app = make_app(api_key=b"s3cret", admin_key=b"admin-s3cret")

    @app.post("/models/{model_id}/load")
    @app.post("/v2/repository/models/{model_id}/unload")
    async def admin(model_id: str) -> dict:
        return {"done": model_id}

    client = TestClient(app)
    user, admin_key = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer admin-s3cret"}
    for path in ["/models/m/load", "/v2/repository/models/m/unload"]:
        r = client.post(path, headers=user)
        assert r.status_code == 403, path
        body = r.json()
        if path.startswith("/v2"):  # the Open Inference Protocol's error shape
            assert set(body) == {"error"} and "needs the admin key" in body["error"]
        else:
            assert body["error"] == "admin_key_required" and "needs the admin key" in body["message"]
        assert client.post(path).status_code == 401
        assert client.post(path, headers=admin_key).json() == {"done": "m"}
    assert client.post("/predict", json={"model_id": "ok"}, headers=admin_key).status_code == 200


def test_with_auth_off_every_route_is_open():
    client = TestClient(make_app())
    assert client.post("/predict", json={"model_id": "ok"}).status_code == 200


def test_a_body_not_received_within_its_deadline_is_408_and_the_connection_closes():
    import asyncio
    from types import SimpleNamespace

    async def read_body(scope, receive, send):  # the routes read the body to its end
        while (await receive()).get("more_body"):
            pass

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

    sent.clear()  # a body that arrives in time is read to its end, and the route answers
    quick = iter([{"type": "http.request", "body": b"{}", "more_body": False}])
    asyncio.run(BodyLimitMiddleware(read_body)(scope, lambda: asyncio.sleep(0, next(quick)), send))
    assert sent == []


def test_a_model_in_its_back_off_is_503_with_retry_after():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/m")
    async def m() -> dict:
        raise ModelUnavailable("Model 'm' could not be loaded (not tried again for 3s)", retry_after_s=2.4)

    r = TestClient(app).get("/m")
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
