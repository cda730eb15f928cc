"""Bad input, faults and limits: a clear JSON error for every mistake, and the app keeps serving.

Runs against the 'limits' app: one worker replica, an API key, small limits,
an image root with a symlink out of it, URL fetching on for one local host,
and a registered model whose files are broken.
"""

import base64
import shutil

import httpx
import pytest

from demo.tiny_models import build_text_model
from serve_app.core.paths import PROJECT_ROOT
from tests.helpers import API_KEY, png_claiming, wait_for

pytestmark = pytest.mark.integration


def post(client, url, model_id, input_data):
    return client.post(f"{url}/predict", json={"model_id": model_id, "input_data": input_data})


def assert_error(r, status, error, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    for w in words:
        assert w in body["message"], body["message"]
    return body


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ids(authed, limits_url):
    body = assert_error(post(authed, limits_url, "nope", "x"), 404, "model_not_found", "alpha", "pixels")
    assert "beta" in body["known_models"]


def test_a_hub_id_or_path_is_never_loaded_from_a_request(authed, limits_url):
    for model_id in ["bert-base-uncased", "distilbert/distilbert-base-uncased", "/etc", "../models/sentiment"]:
        assert post(authed, limits_url, model_id, "x").status_code == 404


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input_data": "x"}, "model_id"),
        ({"model_id": "", "input_data": "x"}, "model_id"),
        ({"model_id": "alpha"}, "input_data"),
        ({"model_id": "alpha", "input_data": ""}, "input_data"),
        ({"model_id": "alpha", "input_data": []}, "input_data"),
        ({"model_id": "alpha", "input_data": {"text": "x"}}, "input_data"),
        ({"model_id": ["alpha"], "input_data": "x"}, "model_id"),
    ],
)
def test_missing_empty_or_wrongly_typed_fields_are_422_naming_the_field(authed, limits_url, body, field):
    assert_error(authed.post(f"{limits_url}/predict", json=body), 422, "invalid_request", field)


def test_malformed_json_is_422(authed, limits_url):
    r = authed.post(
        f"{limits_url}/predict",
        content=b'{"model_id": "alpha", "input_data": ',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 422, "invalid_request", "JSON")


def test_text_to_an_image_model_and_an_image_to_a_text_model_are_422(authed, limits_url):
    assert_error(post(authed, limits_url, "pixels", "This movie was great!"), 422, "invalid_input", "takes an image")
    png = base64.b64encode((PROJECT_ROOT / "samples/images/square.jpg").read_bytes()).decode()
    assert_error(post(authed, limits_url, "alpha", f"data:image/jpeg;base64,{png}"), 422, "invalid_input", "takes text")


def test_a_body_over_the_limit_is_413_before_it_is_parsed(authed, limits_url):
    big = "x" * (100 * 1024)
    assert_error(post(authed, limits_url, "alpha", big), 413, "payload_too_large", str(64 * 1024))
    # Not even JSON: refused by its size, not parsed.
    r = authed.post(f"{limits_url}/predict", content=b"{" * (100 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_chunked_body_over_the_limit_is_413(authed, limits_url):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    r = authed.post(f"{limits_url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_overlong_text_is_truncated_and_answered(authed, limits_url):
    r = post(authed, limits_url, "alpha", "this movie was great " * 2000)  # ~40 KB, far over 32 tokens
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("alpha-")


def test_bytes_that_are_not_an_image_are_400(authed, limits_url):
    junk = base64.b64encode(b"this is not an image, just some bytes" * 4).decode()
    assert_error(post(authed, limits_url, "pixels", junk), 400, "bad_image")


def test_a_truncated_image_is_400(authed, limits_url):
    raw = (PROJECT_ROOT / "samples/images/square.jpg").read_bytes()
    half = base64.b64encode(raw[: len(raw) // 2]).decode()
    assert_error(post(authed, limits_url, "pixels", f"data:image/jpeg;base64,{half}"), 400, "bad_image")


def test_a_decompression_bomb_is_400(authed, limits_url):
    # A PNG whose header claims 100000 x 100000 pixels (10 gigapixels), in a few hundred bytes.
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 1024
    body = assert_error(post(authed, limits_url, "pixels", base64.b64encode(bomb).decode()), 400, "bad_image")
    assert "100000x100000" in body["message"] or "pixels" in body["message"]


def test_a_very_large_valid_image_is_resized_and_answered(authed, limits_url, limits_env):
    assert (limits_env["root"] / "huge.jpg").stat().st_size < 1024 * 1024
    r = post(authed, limits_url, "pixels", str(limits_env["root"] / "huge.jpg"))
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("pixels-")


def test_image_paths_outside_the_root_are_403(authed, limits_url, limits_env):
    root = limits_env["root"]
    for path in [
        f"{root}/../secret.png",
        "/etc/passwd.png",
        str(limits_env["base"] / "secret.png"),
        str(root / "escape.png"),
    ]:  # the last one is a symlink out of the root
        assert_error(post(authed, limits_url, "pixels", path), 403, "forbidden_path")
    assert post(authed, limits_url, "pixels", str(root / "square.jpg")).status_code == 200


def test_urls_are_fetched_only_from_allowed_hosts_within_limits(authed, limits_url, image_server):
    port = image_server.rsplit(":", 1)[1]
    assert post(authed, limits_url, "pixels", f"{image_server}/square.jpg").status_code == 200
    assert_error(
        post(authed, limits_url, "pixels", f"http://localhost:{port}/square.jpg"),
        403,
        "forbidden_path",
        "allowed_hosts",
    )
    assert_error(
        post(authed, limits_url, "pixels", f"ftp://127.0.0.1:{port}/square.jpg"), 403, "forbidden_path", "scheme"
    )
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/big.bin"), 422, "invalid_input", "larger than")
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/missing.jpg"), 400, "bad_image", "404")
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/slow.jpg"), 400, "bad_image", "longer than 5s")


def test_a_list_longer_than_the_limit_is_422(authed, limits_url):
    assert_error(post(authed, limits_url, "alpha", ["hi"] * 9), 422, "invalid_input", "limit of 8")
    assert post(authed, limits_url, "alpha", ["hi"] * 8).status_code == 200


# -- faults ----------------------------------------------------------------------------------------


def test_a_broken_model_is_503_and_the_replica_keeps_serving_until_it_is_fixed(
    authed, limits_url, limits_env, tiny_dir
):
    body = assert_error(post(authed, limits_url, "broken", "hello"), 503, "model_unavailable", "broken")
    assert "could not be loaded" in body["message"]
    assert post(authed, limits_url, "alpha", "hello").status_code == 200  # the replica still serves
    info = authed.get(f"{limits_url}/models/broken").json()
    assert info["state"] == "failed" and info["last_error"]
    assert_error(post(authed, limits_url, "broken", "hello"), 503, "model_unavailable")  # tried again, not cached

    # Fix the files: the next request loads the model.
    fixed = limits_env["broken"]
    shutil.rmtree(fixed)
    build_text_model(fixed, "broken")
    r = post(authed, limits_url, "broken", "hello")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("broken-")
    assert wait_for(lambda: authed.get(f"{limits_url}/models/broken").json()["state"] == "loaded")


# -- security --------------------------------------------------------------------------------------


def test_every_endpoint_but_health_needs_the_api_key(limits_url):
    with httpx.Client(timeout=60) as anon:
        for method, path in [
            ("GET", "/models"),
            ("GET", "/models/alpha"),
            ("POST", "/predict"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/v2"),
            ("POST", "/v2/models/alpha/infer"),
            ("POST", "/v2/repository/index"),
        ]:
            r = anon.request(method, f"{limits_url}{path}", json={"model_id": "alpha", "input_data": "x"})
            assert r.status_code == 401, (path, r.status_code)
            if path.startswith("/v2"):  # the Open Inference Protocol's error shape
                assert set(r.json()) == {"error"} and "API key" in r.json()["error"]
            else:
                assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = anon.get(f"{limits_url}/models", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401
        for path in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"]:
            assert anon.get(f"{limits_url}{path}").status_code == 200, path


def test_the_api_key_is_never_logged(authed, limits_url):
    import glob

    from serve_app.core import ray_internals

    assert authed.get(f"{limits_url}/models").status_code == 200
    logs = ray_internals.logs_dir()
    leaked = []
    for path in glob.glob(f"{logs}/**/*", recursive=True):
        try:
            with open(path, "rb") as f:
                if API_KEY.encode() in f.read():
                    leaked.append(path)
        except (IsADirectoryError, PermissionError, FileNotFoundError):
            continue
    assert not leaked, leaked
