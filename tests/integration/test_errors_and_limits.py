"""Bad input, faults and limits: a clear JSON error for every mistake, and the app keeps serving.

Runs against the 'limits' app: one worker replica, auth on (keys from the environment), small limits,
an image root with a symlink out of it, URL fetching on for one local host, and a registered model whose
files are broken. docs/errors-and-limits.md names, for each row, the test here that asserts it.
"""

import base64
import io
import shutil
import socket
import threading

import httpx
import pytest
from PIL import Image

from demo.tiny_models import build_text_model
from serve_app.core.paths import PROJECT_ROOT
from tests.helpers import API_KEY, png_claiming, replicas, wait_for

pytestmark = pytest.mark.integration

KNOWN = ["alpha", "beta", "gamma", "delta", "pixels", "broken", "epsilon", "cracked", "stuck"]


def post(client, url, model_id, input_data):
    return client.post(f"{url}/predict", json={"model_id": model_id, "input_data": input_data})


def assert_error(r, status, error, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    for w in words:
        assert w in body["message"], body["message"]
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_the_known_ids(authed, limits_url):
    body = assert_error(post(authed, limits_url, "nope", "x"), 404, "model_not_found", "Unknown model 'nope'")
    assert body["known_models"] == KNOWN and body["model_id"] == "nope"
    assert body["message"] == f"Unknown model 'nope'. Known models: {', '.join(KNOWN)}"


def test_an_unknown_model_id_is_echoed_in_part_only(authed, limits_url):
    # A model id as long as the body allows (64 KiB here, 8 MiB in the demo app): the answer quotes 80 of its
    # characters, and so does every route that looks a model up by a name in its path.
    r = post(authed, limits_url, "a" * 60_000, "x")
    body = assert_error(r, 404, "model_not_found")
    assert body["model_id"] == "a" * 80 + "..." and body["message"].startswith(f"Unknown model '{'a' * 80}...'.")
    assert len(r.content) < 600
    long_id = "b" * 6000  # (not an inference: test_operations counts this app's requests for unknown models)
    for r in (authed.get(f"{limits_url}/v2/models/{long_id}"), authed.get(f"{limits_url}/models/{long_id}")):
        assert r.status_code == 404 and len(r.content) < 600 and "b" * 81 not in r.text, (r.status_code, r.text[:200])


def test_a_hub_id_or_path_is_never_loaded_from_a_request(authed, limits_url):
    for model_id in ["bert-base-uncased", "distilbert/distilbert-base-uncased", "/etc", "../models/sentiment"]:
        body = assert_error(post(authed, limits_url, model_id, "x"), 404, "model_not_found")
        assert body["model_id"] == model_id and body["known_models"] == KNOWN


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
    r = assert_error(authed.post(f"{limits_url}/predict", json=body), 422, "invalid_request", field)
    assert field in {p["field"].split(".")[0] for p in r["problems"]}


def test_malformed_json_is_400(authed, limits_url):
    # Refused by the bounded reader of the body, which never hands what it cannot read to the full parse; a
    # lone surrogate, which that reader takes and the full parse does not, is refused as not JSON all the same.
    for body in (
        b'{"model_id": "alpha", "input_data": ',
        b'{"model_id": "alpha", "input_data": NaN}',
        b'{"model_id": "alpha", "input_data": "\\ud800"}',
    ):
        r = authed.post(f"{limits_url}/predict", content=body, headers={"content-type": "application/json"})
        assert_error(r, 400, "malformed_request", "not valid JSON")


def test_text_to_an_image_model_and_an_image_to_a_text_model_are_422_naming_the_model(authed, limits_url):
    text = post(authed, limits_url, "pixels", "This movie was great!")
    assert assert_error(text, 422, "invalid_input", "takes an image")["model_id"] == "pixels"
    png = b64((PROJECT_ROOT / "samples/images/square.jpg").read_bytes())
    image = post(authed, limits_url, "alpha", f"data:image/jpeg;base64,{png}")
    assert assert_error(image, 422, "invalid_input", "takes text")["model_id"] == "alpha"


def test_a_body_over_the_limit_is_413_before_it_is_parsed(authed, limits_url):
    big = "x" * (100 * 1024)
    body = assert_error(post(authed, limits_url, "alpha", big), 413, "payload_too_large", str(64 * 1024))
    assert body["limit"] == 64 * 1024
    # Not even JSON: refused by its size, not parsed.
    r = authed.post(f"{limits_url}/predict", content=b"{" * (100 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["limit"] == 64 * 1024


def test_a_chunked_body_over_the_limit_is_413(authed, limits_url):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    r = authed.post(f"{limits_url}/predict", content=chunks(), headers={"content-type": "application/json"})
    body = assert_error(r, 413, "payload_too_large", "larger than 65536 bytes")
    assert body["limit"] == 64 * 1024


def test_text_over_the_model_length_is_truncated_and_text_over_the_character_limit_is_422(authed, limits_url):
    r = post(authed, limits_url, "alpha", "this movie was great " * 500)  # 10,500 characters, far over 32 tokens
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("alpha-")
    body = assert_error(post(authed, limits_url, "alpha", "x" * 12_001), 422, "invalid_input", "limit of 12000")
    assert body["message"] == "input_data[0]: a text of 12001 characters is longer than the limit of 12000 characters"


def test_bytes_that_are_not_an_image_are_400(authed, limits_url):
    junk = b64(b"this is not an image, just some bytes" * 4)
    assert_error(post(authed, limits_url, "pixels", junk), 400, "bad_image", "input_data[0]", "not a readable image")


def test_a_truncated_image_is_400_naming_the_input(authed, limits_url):
    # Its header is whole, so the ingress passes it; the worker's decode finds it truncated, and names it.
    raw = (PROJECT_ROOT / "samples/images/square.jpg").read_bytes()
    half = b64(raw[: len(raw) // 2])
    inputs = [b64(raw), f"data:image/jpeg;base64,{half}"]
    assert_error(post(authed, limits_url, "pixels", inputs), 400, "bad_image", "input_data[1]: not a readable image")


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (100_000, 100_000)])
def test_a_decompression_bomb_is_400_by_the_apps_own_pixel_limit(authed, limits_url, width, height):
    # A PNG whose header claims 100 megapixels (over this app's limit of 25) or 10 gigapixels (over Pillow's
    # own limit too), in a few hundred bytes: refused by this app's limit, named in the message, both times.
    bomb = png_claiming(width, height)
    assert len(bomb) < 1024
    body = assert_error(
        post(authed, limits_url, "pixels", b64(bomb)), 400, "bad_image", "more than the limit of 25000000"
    )
    if width == 10_000:
        assert body["message"] == "input_data[0]: 10000x10000 pixels is more than the limit of 25000000"


def test_a_very_large_valid_image_is_answered(authed, limits_url, limits_env):
    # 6000 x 4000: the worker shrinks it to 1024 px a side as it decodes it
    # (tests/unit/test_runtimes.py::test_a_very_large_image_is_shrunk_to_1024_pixels_a_side_when_decoded).
    assert (limits_env["root"] / "huge.jpg").stat().st_size < 1024 * 1024
    r = post(authed, limits_url, "pixels", str(limits_env["root"] / "huge.jpg"))
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"].startswith("pixels-")


def test_images_over_the_pixel_budget_of_one_request_are_422(authed, limits_url, limits_env):
    root = limits_env["root"]
    assert post(authed, limits_url, "pixels", [str(root / f"big{k}.png") for k in range(2)]).status_code == 200
    body = assert_error(
        post(authed, limits_url, "pixels", [str(root / f"big{k}.png") for k in range(3)]), 422, "invalid_input"
    )
    assert body["message"] == "input_data[2]: the images of this request have more than 40000000 pixels together"


@pytest.mark.parametrize("name", ["tagged.tiff", "tiff-named.png"])
def test_only_jpeg_png_webp_gif_and_bmp_are_read(authed, limits_url, limits_env, name):
    data = (limits_env["root"] / name).read_bytes()
    for form in (b64(data), str(limits_env["root"] / name)):
        r = post(authed, limits_url, "pixels", form)
        if name.endswith(".tiff") and form.endswith(".tiff"):  # not even taken for an image path
            assert_error(r, 422, "invalid_input", "takes an image")
        else:
            assert_error(r, 400, "bad_image", "JPEG, PNG, WEBP, GIF, BMP")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="WEBP")
    assert post(authed, limits_url, "pixels", b64(buf.getvalue())).status_code == 200


def test_an_image_over_the_byte_limit_is_422_as_base64_and_as_a_path(authed, limits_url, limits_env):
    # The limits app's body limit (64 KiB) is under its image limit (1 MiB): a path reaches the image limit.
    body = assert_error(
        post(authed, limits_url, "pixels", str(limits_env["root"] / "over-limit.jpg")), 422, "invalid_input"
    )
    assert body["message"] == "input_data[0]: the image is larger than 1048576 bytes"
    # base64 is refused by the body limit first: 413, the same limit the README gives for it.
    assert post(authed, limits_url, "pixels", "A" * (1024 * 1024 + 100)).status_code == 413


def test_an_image_path_that_does_not_exist_or_cannot_be_read_is_422(authed, limits_url, limits_env):
    root = limits_env["root"]
    body = assert_error(post(authed, limits_url, "pixels", str(root / "missing.jpg")), 422, "invalid_input")
    assert body["message"].startswith("input_data[0]: no image file at")
    long_name = str(root / ("x" * 300 + ".jpg"))  # longer than the file system allows: was a 500
    body = assert_error(post(authed, limits_url, "pixels", long_name), 422, "invalid_input", "no readable image file")
    assert body["message"].endswith("(File name too long)")


def test_image_paths_outside_the_root_are_403_without_naming_the_root(authed, limits_url, limits_env):
    root = limits_env["root"]
    for path in [
        f"{root}/../secret.png",
        "/etc/passwd.png",
        str(limits_env["base"] / "secret.png"),
        str(root / "escape.png"),  # a symlink out of the root
    ]:
        body = assert_error(post(authed, limits_url, "pixels", path), 403, "forbidden_path", "image root")
        assert str(root) not in body["message"] and str(limits_env["base"]) not in body["message"]
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
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/missing.jpg"), 400, "bad_image", "HTTP 404")
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/redirect.jpg"), 400, "bad_image", "HTTP 302")
    assert_error(post(authed, limits_url, "pixels", f"{image_server}/slow.jpg"), 400, "bad_image", "longer than 5s")


def test_a_list_longer_than_the_limit_is_422(authed, limits_url):
    body = assert_error(post(authed, limits_url, "alpha", ["hi"] * 9), 422, "invalid_input")
    assert body["message"] == "input_data: a list of 9 inputs is longer than the limit of 8"
    assert post(authed, limits_url, "alpha", ["hi"] * 8).status_code == 200


def test_a_body_holding_more_json_values_than_the_limits_need_is_422_before_it_is_parsed(authed, limits_url):
    # 60,000 one-character strings in 64 KB: refused while it is read, not after a million-item parse.
    crowd = b'{"model_id": "alpha", "input_data": [' + b",".join([b'"x"'] * 15_000) + b"]}"
    r = authed.post(f"{limits_url}/predict", content=crowd, headers={"content-type": "application/json"})
    assert_error(
        r, 422, "invalid_input", "more JSON values than a request of at most 8 inputs and its parameters needs"
    )


# -- faults ----------------------------------------------------------------------------------------


def test_a_broken_model_is_503_without_evicting_a_healthy_one_and_loads_once_fixed(
    authed, limits_url, limits_env, tiny_dir
):
    """A broken model: 503 naming it and why, no server path in the answer; the replica keeps serving. The
    failure is remembered for load_failure_backoff_s (5 s here): requests meanwhile are 503 without a load
    attempt, so they evict nothing. Once the files are fixed, the next attempt loads it."""

    def model(model_id):
        return authed.get(f"{limits_url}/models/{model_id}").json()

    def counters():
        return replicas(authed, limits_url)[0]["counters"]

    assert post(authed, limits_url, "alpha", "hello").status_code == 200
    refused, failures = counters()["refused_in_backoff"], model("broken")["load_failures"]
    first = post(authed, limits_url, "broken", "hello")
    in_backoff = post(authed, limits_url, "broken", "hello")  # at once: well within the back-off
    body = assert_error(first, 503, "model_unavailable", "'broken' could not be loaded")
    assert str(limits_env["base"]) not in body["message"] and str(PROJECT_ROOT) not in body["message"]
    assert first.headers["retry-after"] == "5" and body["retry_after_s"] == 5  # load_failure_backoff_s
    again = assert_error(in_backoff, 503, "model_unavailable", "not tried again for")
    assert 1 <= int(in_backoff.headers["retry-after"]) <= 5  # the seconds left of the back-off, rounded up
    assert str(limits_env["base"]) not in again["message"]
    assert wait_for(lambda: model("broken")["state"] == "failed" and model("broken")["last_error"])
    assert str(limits_env["base"]) not in model("broken")["last_error"]
    assert wait_for(lambda: counters()["refused_in_backoff"] == refused + 1)
    assert model("broken")["load_failures"] == failures + 1  # one attempt, none in the back-off...
    assert "alpha" in replicas(authed, limits_url)[0]["models"]  # ...so nothing was evicted for a second one
    assert post(authed, limits_url, "alpha", "hello").status_code == 200  # the replica still serves

    shutil.rmtree(limits_env["broken"])
    build_text_model(limits_env["broken"], "broken")
    assert wait_for(lambda: post(authed, limits_url, "broken", "hello").status_code == 200)  # after the back-off
    r = post(authed, limits_url, "broken", "hello")
    assert r.json()["predictions"][0]["label"].startswith("broken-")
    assert wait_for(lambda: model("broken")["state"] == "loaded")


def test_a_load_that_hangs_fails_at_its_timeout_and_the_replicas_other_models_load_meanwhile(
    authed, admin, limits_url, limits_env
):
    """'stuck' loads only once the file stuck_gate exists (tests.byo_runtimes:Sized). A load holds the replica's
    model cache while it runs: past worker.load_timeout_s (6 s here) it fails with a 503 that says so, and a
    cold load of another model on the same (only) replica is answered while the stuck load's thread goes on."""
    from tests.integration.conftest import LIMITS_LOAD_TIMEOUT_S

    def model(model_id):
        return authed.get(f"{limits_url}/models/{model_id}").json()

    assert not limits_env["stuck_gate"].exists()  # shut, so that the load hangs
    try:
        r = post(authed, limits_url, "stuck", "hello")
        assert_error(r, 503, "model_unavailable", f"did not finish within {LIMITS_LOAD_TIMEOUT_S}s", "load_timeout_s")
        assert admin.post(f"{limits_url}/models/delta/unload").status_code == 200  # delta's next request loads it
        assert post(authed, limits_url, "delta", "hello").status_code == 200
        assert model("stuck")["state"] == "failed" and "load_timeout_s" in model("stuck")["last_error"]
        assert replicas(authed, limits_url)[0]["counters"]["load_timeouts"] >= 1
    finally:
        limits_env["stuck_gate"].touch()  # the stuck thread returns, and its copy is freed


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
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            if path.startswith("/v2"):  # the Open Inference Protocol's error shape
                assert r.json() == {"error": message}
            else:
                assert r.json() == {"error": "unauthorized", "message": message}
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = anon.get(f"{limits_url}/models", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        for path in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"]:
            assert anon.get(f"{limits_url}{path}").status_code == 200, path


def test_load_and_unload_need_the_admin_key(authed, admin, limits_url):
    for path in ["/models/gamma/load", "/models/gamma/unload"]:
        assert_error(authed.post(f"{limits_url}{path}"), 403, "admin_key_required", "needs the admin key")
    for path in ["/v2/repository/models/gamma/load", "/v2/repository/models/gamma/unload"]:
        r = authed.post(f"{limits_url}{path}")
        assert r.status_code == 403 and "needs the admin key" in r.json()["error"]
    for char in ["%0A", "%0D", "%00"]:  # the router would read each as the route itself
        for path in ["/models/gamma/load", "/models/gamma/unload", "/v2/repository/models/gamma/unload"]:
            r = authed.post(f"{limits_url}{path}{char}")
            assert r.status_code == 400 and "control character" in r.text, (path, char)
    assert admin.post(f"{limits_url}/models/gamma/load").json()["state"] == "loaded"
    assert admin.post(f"{limits_url}/predict", json={"model_id": "gamma", "input_data": "hi"}).status_code == 200


def test_the_api_key_is_never_logged(authed, limits_url):
    """Every Ray log file of the session is searched, once the request's own lines are in them: the search
    finds the request and never the key."""
    from serve_app.core import ray_internals

    marker = "never-logged-probe-5d1e"
    assert authed.get(f"{limits_url}/models", headers={"X-Request-ID": marker}).status_code == 200
    logs = ray_internals.logs_dir()

    def search() -> tuple[list[str], list[str]]:
        found, leaked = [], []
        for path in logs.rglob("*"):
            try:
                text = path.read_bytes()
            except (IsADirectoryError, PermissionError, FileNotFoundError):
                continue
            if marker.encode() in text:
                found.append(str(path))
            if API_KEY.encode() in text:
                leaked.append(str(path))
        return found, leaked

    assert wait_for(lambda: search()[0]), "the request's log lines never reached the log files"
    found, leaked = search()
    assert found and not leaked, leaked


# -- slow senders ----------------------------------------------------------------------------------


def test_slow_senders_are_cut_off_at_the_body_deadline_and_a_probe_is_answered_meanwhile(limits_url):
    """As many connections as the ingress replica takes requests at once (max_ongoing_requests, 64) each
    announce a 60,000-byte body and send a byte a second: each holds one of those requests until
    body_timeout_s (2 s here). A probe of the app's own route, sent once every slow request has reached the
    ingress, is answered while the senders go on sending, and the server ends every one of them: answered 408
    (at least half seen so), or its connection closed (a byte the sender sends just after the answer resets
    the connection, which discards the answer). (Without the deadline, the probe waits until the senders
    stop: here, when the test gives up on it.)"""
    url = httpx.URL(limits_url)
    senders = 64
    head = (
        f"POST {url.path}/predict HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 60000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    stop, reached = threading.Event(), threading.Semaphore(0)
    outcomes: list[str] = ["not started"] * senders

    def slow_sender(i: int) -> None:
        seen, counted = b"", False
        outcomes[i] = "still sending"
        try:
            with socket.create_connection((url.host, url.port), timeout=30) as sock:
                sock.sendall(head)
                sock.settimeout(1.0)
                while not stop.is_set():
                    try:
                        data = sock.recv(4096)
                    except TimeoutError:  # nothing to read this second: one more byte of the body
                        sock.sendall(b" ")
                        continue
                    if not data:
                        outcomes[i] = "closed"
                        break
                    seen += data
                    if b"100 Continue" in seen and not counted:  # the request has reached the ingress's app
                        reached.release()
                        counted = True
                    final = [s for s in seen.split(b"\r\n") if s.startswith(b"HTTP/1.1 ") and b" 100 " not in s]
                    if final:
                        outcomes[i] = final[0].decode()
                        break
        except OSError:  # reset by the server: a byte sent after its answer and close discards the answer
            outcomes[i] = "closed"
        finally:
            if not counted:
                reached.release()

    threads = [threading.Thread(target=slow_sender, args=(i,), daemon=True) for i in range(senders)]
    for t in threads:
        t.start()
    give_up = threading.Timer(30, stop.set)  # the senders' own end: they send for 30 s at most
    give_up.start()
    try:
        for _ in range(senders):
            assert reached.acquire(timeout=60)
        probe = httpx.get(f"{limits_url}/healthz", timeout=120)
        answered_while_sending = not stop.is_set()
        for t in threads:  # the server ends each slow request at its deadline: the senders stop on their own
            t.join(timeout=20)
    finally:
        stop.set()
        give_up.cancel()
        for t in threads:
            t.join(timeout=30)
    assert probe.status_code == 200
    assert answered_while_sending, "the probe was answered only once the slow senders stopped"
    # Every slow request was ended by the server, before the senders would have stopped: answered 408, or its
    # connection closed (a byte sent just after the answer resets the connection, which discards the answer).
    assert set(outcomes) <= {"HTTP/1.1 408 Request Timeout", "closed"}, outcomes
    assert outcomes.count("HTTP/1.1 408 Request Timeout") >= senders // 2, outcomes
