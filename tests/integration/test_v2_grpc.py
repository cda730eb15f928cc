"""The Open Inference Protocol over gRPC, through Ray Serve's gRPC proxy (HAProxy's gRPC frontend in the
mode `make run` starts), driven by Triton's standard client, tritonclient.grpc, unchanged: every RPC, text
and image models, raw and non-raw tensor contents, each error's status code, and the API key.

Several apps run side by side, so every call names its app in the ``application`` metadata: 'demo'
(serve_config.yaml's args, auth off) and 'limits' (an API key and an admin key, small limits).
"""

import glob
import shutil
import threading

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serve_app.core.paths import PROJECT_ROOT
from tests.helpers import (
    ADMIN_KEY,
    API_KEY,
    metric_sum,
    pb_field,
    pb_parameters,
    pb_varint,
    png_claiming,
    settled,
    tiny_args,
    wait_for,
)

pytestmark = pytest.mark.integration

DEMO = {"application": "demo"}
LIMITS = {"application": "limits", "authorization": f"Bearer {API_KEY}"}
LIMITS_ADMIN = {"application": "limits", "authorization": f"Bearer {ADMIN_KEY}"}
IMAGES = PROJECT_ROOT / "samples/images"


def routed(client: triton.InferenceServerClient, headers: dict) -> bool:
    """Whether the gRPC entry routes to the app yet (HAProxy learns of a new app shortly after it runs)."""
    try:
        return client.is_server_live(headers=headers)
    except InferenceServerException:
        return False


@pytest.fixture(scope="module")
def client(grpc_target, demo_url, limits_url):
    c = triton.InferenceServerClient(grpc_target)
    assert wait_for(lambda: routed(c, DEMO) and routed(c, LIMITS), timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(grpc_target, demo_url):
    """The service's generated stub (tritonclient's), for what tritonclient.grpc does not send:
    tensors in ``contents`` instead of ``raw_input_contents``."""
    with grpc.insecure_channel(grpc_target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def bytes_input(name: str, *elements: bytes) -> triton.InferInput:
    inp = triton.InferInput(name, [len(elements)], "BYTES")
    inp.set_data_from_numpy(np.array(elements, dtype=np.object_))
    return inp


def labels(result) -> list[str]:
    return [x.decode() for x in result.as_numpy("label").tolist()]


def error_of(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    return e.value.status(), e.value.message()


# -- every RPC, on the demo app -------------------------------------------------------------------------


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live(headers=DEMO)
    assert client.is_server_ready(headers=DEMO)
    meta = client.get_server_metadata(headers=DEMO, as_json=True)
    assert meta["name"] == "multimodel-serve" and meta["extensions"] == ["model_repository"]


def test_model_metadata_of_a_text_and_an_image_model(client):
    for model, modality in (("sentiment", "text"), ("image", "image")):
        meta = client.get_model_metadata(model, headers=DEMO, as_json=True)
        assert meta["name"] == model and meta["versions"] == ["1"]
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [(modality, "BYTES")]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("label", "BYTES"), ("score", "FP32")]


def test_text_inference_with_raw_contents(client):
    texts = bytes_input("text", b"This movie was great!", b"Dreadful film, a total waste of time.")
    result = client.infer("sentiment", [texts], request_id="req-7", headers=DEMO)
    assert labels(result) == ["positive", "negative"]
    scores = result.as_numpy("score")
    assert scores.dtype == np.float32 and scores.shape == (2,) and (scores > 0.5).all()
    response = result.get_response()
    assert (response.model_name, response.id) == ("sentiment", "req-7")
    assert len(response.raw_output_contents) == 2  # raw in, raw out
    assert wait_for(lambda: client.is_model_ready("sentiment", headers=DEMO))  # the replicas' next report


def test_image_inference_with_raw_contents_and_one_output(client):
    image = bytes_input("image", (IMAGES / "triangle.jpg").read_bytes(), (IMAGES / "circle.jpg").read_bytes())
    result = client.infer("image", [image], outputs=[triton.InferRequestedOutput("label")], headers=DEMO)
    assert labels(result) == ["triangle", "circle"]
    assert [o.name for o in result.get_response().outputs] == ["label"]


@pytest.mark.parametrize(
    "model, payload, label",
    [
        ("spam", b"Win a free iPhone now! Click here to claim your prize", "spam"),
        ("image", (IMAGES / "square.jpg").read_bytes(), "square"),
    ],
)
def test_inference_with_non_raw_contents(stub, model, payload, label):
    request = pb.ModelInferRequest(model_name=model, id="c1")
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(payload)
    response, call = stub.ModelInfer.with_call(request, metadata=(*DEMO.items(), ("request_id", f"trace-{model}")))
    assert ("request_id", f"trace-{model}") in call.trailing_metadata()  # Serve's request id comes back
    assert not response.raw_output_contents  # contents in, contents out
    out = {o.name: o for o in response.outputs}
    assert list(out["label"].contents.bytes_contents) == [label.encode()]
    assert 0.5 < out["score"].contents.fp32_contents[0] <= 1.0 and response.id == "c1"


def test_grpc_and_rest_give_the_same_answer(client, demo_url):
    text = "The plot was dull and the acting wooden."
    result = client.infer("sentiment", [bytes_input("text", text.encode())], headers=DEMO)
    rest = httpx.post(f"{demo_url}/predict", json={"model_id": "sentiment", "input_data": text}, timeout=60).json()
    assert labels(result) == [rest["predictions"][0]["label"]]
    assert result.as_numpy("score")[0] == pytest.approx(rest["predictions"][0]["score"], rel=1e-4)


def test_the_model_repository(client, demo_url):
    index = {m["name"]: m for m in client.get_model_repository_index(headers=DEMO, as_json=True)["models"]}
    assert set(index) == {"sentiment", "spam", "image", "embed", "ner", "image-embed"}

    client.load_model("spam", headers=DEMO)
    assert client.is_model_ready("spam", headers=DEMO)
    assert "spam" in {m["name"] for m in client.get_model_repository_index(headers=DEMO, as_json=True)["models"]}

    client.unload_model("spam", headers=DEMO)
    assert wait_for(lambda: not client.is_model_ready("spam", headers=DEMO))
    index = {m["name"]: m for m in client.get_model_repository_index(headers=DEMO, as_json=True)["models"]}
    assert index["spam"]["state"] == "UNAVAILABLE"
    replicas = httpx.get(f"{demo_url}/models", timeout=60).json()["replicas"]
    assert all("spam" not in r["models"] for r in replicas)


def test_requests_are_counted_by_the_one_data_plane(client, metrics_url):
    def count() -> float:
        text = httpx.get(metrics_url, timeout=10).text
        return metric_sum(text, "ray_mms_requests_total", application="demo", model="spam", api="v2_grpc")

    before = settled(count)  # the repository test's load and unload of spam are counted too
    for _ in range(3):
        client.infer("spam", [bytes_input("text", b"lunch at noon?")], headers=DEMO)
    assert wait_for(lambda: count() - before == 3, timeout=30, interval=1), count() - before


def test_an_rpc_the_app_does_not_serve_is_unimplemented(client):
    status, message = error_of(client.get_model_config, "sentiment", headers=DEMO)
    assert status == "StatusCode.UNIMPLEMENTED" and "ModelInfer" in message


# -- errors: one status code each, with the message REST gives ------------------------------------------


def test_an_unknown_model_is_not_found(client):
    for call, args in (
        (client.infer, ("nope", [bytes_input("text", b"hi")])),
        (client.get_model_metadata, ("nope",)),
        (client.is_model_ready, ("nope",)),
    ):
        status, message = error_of(call, *args, headers=DEMO)
        assert status == "StatusCode.NOT_FOUND" and "Unknown model 'nope'" in message and "sentiment" in message
    # A name as long as a message allows is quoted in part: 80 of its characters.
    status, message = error_of(client.infer, "n" * 4_000_000, [bytes_input("text", b"hi")], headers=DEMO)
    assert status == "StatusCode.NOT_FOUND" and len(message) < 400 and "n" * 81 not in message, message[:300]


def test_bad_input_is_invalid_argument(client):
    fp32 = triton.InferInput("text", [1], "FP32")
    fp32.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    cases = [
        ("sentiment", [fp32], "must be BYTES, not FP32"),
        ("sentiment", [bytes_input("a", b"x"), bytes_input("b", b"y")], "one input tensor, got 2"),
        ("image", [bytes_input("image", b"this is not an image, just some bytes")], "not a readable image"),
        ("sentiment", [bytes_input("text", b"\xff\xfe not utf-8")], "UTF-8"),
    ]
    for model, inputs, words in cases:
        status, message = error_of(client.infer, model, inputs, headers=DEMO)
        assert status == "StatusCode.INVALID_ARGUMENT" and words in message, message
    unknown_output = [triton.InferRequestedOutput("probabilities")]
    status, message = error_of(
        client.infer, "sentiment", [bytes_input("text", b"hi")], outputs=unknown_output, headers=DEMO
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown output(s): probabilities" in message
    top_two = [triton.InferRequestedOutput("label", class_count=2)]  # Triton's classification extension
    status, message = error_of(client.infer, "sentiment", [bytes_input("text", b"hi")], outputs=top_two, headers=DEMO)
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameter 'classification' is not supported" in message


def test_up_to_max_body_bytes_reaches_the_app_and_more_is_resource_exhausted(client):
    limit = 8 * 1024 * 1024  # serve_config.yaml's max_body_bytes (the default)
    # Just under the limit: HAProxy and the gRPC servers pass it, and the app answers (an unknown model).
    status, _ = error_of(client.infer, "nope", [bytes_input("text", b"x" * (limit - 1024))], headers=DEMO)
    assert status == "StatusCode.NOT_FOUND"
    # Over it: refused by the transport, before the message is read (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE in
    # config/serve.env), not by the app once it has decoded it ("the request body is larger than ...").
    status, message = error_of(client.infer, "nope", [bytes_input("text", b"x" * (limit + 1))], headers=DEMO)
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in message, message


# -- messages of many fields: counted before they are built ---------------------------------------------


@pytest.fixture(scope="module")
def raw_infer(grpc_target, demo_url):
    """ModelInfer with a message sent as the bytes given (messages no client library would build)."""
    with grpc.insecure_channel(grpc_target) as channel:
        yield channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString,
        )


def raw_error(raw_infer, message: bytes, headers: dict = DEMO) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        raw_infer(message, metadata=tuple(headers.items()), timeout=120)
    return e.value.code(), e.value.details()


def test_the_fields_of_a_message_are_counted_before_it_is_built(raw_infer):
    name = pb_field(1, b"sentiment")
    cases = [
        # The message: 100,000 parameters and no input (1.4 MB) was decoded whole, then read entry by entry.
        (name + pb_parameters(100_000), "parameters: 100000 entries, more than the 64 this server takes"),
        (name + pb_field(5) * 4_000_000, "inputs: 4000000 entries, more than the 16 this server takes"),
        (name + pb_field(5, pb_parameters(1000)), "inputs[0].parameters: 1000 entries, more than the 64"),
        (name + pb_field(6, pb_parameters(100, number=2)), "outputs[0].parameters: 100 entries, more than the 64"),
    ]
    for message, words in cases:
        code, details = raw_error(raw_infer, message)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and words in details, (code, details)
    code, details = raw_error(raw_infer, name + b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInferRequest" in details, details


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ServerLive"])
def test_bytes_that_are_not_the_message_of_any_rpc_are_invalid_argument(grpc_target, demo_url, rpc):
    """Those of the RPCs that grpc decodes as well as those the app decodes itself (ModelInfer, above)."""
    with grpc.insecure_channel(grpc_target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}", request_serializer=None)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff", metadata=tuple(DEMO.items()), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert e.value.details() == f"the request is not a valid {rpc}Request message"


def _worst_within_the_limits() -> bytes:
    """8 MiB that the app decodes and builds whole: 16 input tensors and 16 outputs of 64 parameters each, 64
    parameters, and about 4 million one-byte-key unknown fields (answered: the model takes one input tensor)."""
    tensor = pb_field(5, pb_parameters(64) + pb_field(1, b"text"))
    output = pb_field(6, pb_parameters(64, number=2) + pb_field(1, b"label"))
    head = pb_field(1, b"sentiment") + tensor * 16 + output * 16 + pb_parameters(64)
    filler = pb_varint(15 << 3) + b"\x01"  # field 15, unknown to ModelInferRequest
    return head + filler * ((8 * 1024 * 1024 - len(head)) // 2)


def test_a_flood_of_the_costliest_messages_leaves_the_ingress_answering(raw_infer, client):
    """The costliest messages within the limits, and the issue's 400,000 parameters (6.4 MB; 3.7 s each before),
    three clients sending four each: every one answered as it should be, and a probe of the ingress (ServerLive)
    sent once the first is answered is answered before the last. docs/errors-and-limits.md has the CPU cost
    of each (tests/unit/test_v2_grpc.py measures it)."""
    worst, crowd = _worst_within_the_limits(), pb_field(1, b"sentiment") + pb_parameters(400_000)
    assert len(worst) <= 8 * 1024 * 1024
    order, first, errors = [], threading.Event(), []

    def flood() -> None:
        try:
            for message in (worst, crowd, worst, crowd):
                code, details = raw_error(raw_infer, message)
                expected = "one input tensor, got 16" if message is worst else "parameters: 400000 entries"
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), code
                assert expected in details, details
                order.append("flood")
                first.set()
        except BaseException as e:
            errors.append(e)
            first.set()

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    assert first.wait(timeout=300)
    assert client.is_server_live(headers=DEMO)
    order.append("probe")
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert order.index("probe") < len(order) - 1 and order.count("flood") == 12, order


def test_a_shape_that_disagrees_with_its_data_is_invalid_argument(stub):
    for shape, elements in (([-7, 99999999999], [b"hi"]), ([2], [b"hi"])):
        request = pb.ModelInferRequest(model_name="sentiment")
        request.inputs.add(name="text", datatype="BYTES", shape=shape).contents.bytes_contents.extend(elements)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, metadata=tuple(DEMO.items()))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in e.value.details()


def test_over_a_limit_is_resource_exhausted(client):
    cases = [
        (LIMITS, "alpha", [bytes_input("text", *[b"hi"] * 9)], "more than the limit of 8 elements"),
        (LIMITS, "alpha", [bytes_input("text", b"x" * (64 * 1024))], "the request body is larger than 65536 bytes"),
        (LIMITS, "pixels", [bytes_input("image", png_claiming(10_000, 10_000))], "10000x10000 pixels is more than"),
        (
            LIMITS,
            "pixels",
            [bytes_input("image", png_claiming(100_000, 100_000))],
            "the image is more than the limit of",
        ),
        # The 'limits' app's body limit is below its image limit: the demo app's 5 MiB image limit.
        (DEMO, "image", [bytes_input("image", b"x" * (5 * 1024 * 1024 + 1))], "larger than 5242880 bytes"),
    ]
    for headers, model, inputs, words in cases:
        status, message = error_of(client.infer, model, inputs, headers=headers)
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and words in message, message
    # Within the limits, answered.
    assert len(labels(client.infer("alpha", [bytes_input("text", *[b"hi"] * 8)], headers=LIMITS))) == 8


def test_a_model_that_cannot_load_is_unavailable(client, limits_env, grpc_target):
    # The 'limits' app's broken model (another test may have fixed it: break it again, and unload it).
    client.unload_model("broken", headers=LIMITS_ADMIN)
    broken = limits_env["broken"]
    shutil.rmtree(broken)
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    status, message = error_of(client.infer, "broken", [bytes_input("text", b"hello")], headers=LIMITS)
    assert status == "StatusCode.UNAVAILABLE" and "could not be loaded" in message and "broken" in message
    # In its load back-off: when to come again, as REST's Retry-After, in the trailing metadata.
    request = pb.ModelInferRequest(model_name="broken")
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    with grpc.insecure_channel(grpc_target) as channel, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=tuple(LIMITS.items()))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "not tried again for" in e.value.details()
    assert 1 <= int(dict(e.value.trailing_metadata())["retry-after"]) <= 5  # the limits app's back-off: 5 s
    assert labels(client.infer("alpha", [bytes_input("text", b"hello")], headers=LIMITS))[0].startswith("alpha-")


@pytest.fixture(scope="module")
def slow_app(client, deploy, tiny_registry):
    from serve_app.core import ray_internals

    # A timeout far shorter than any model load: every cold prediction runs out of time.
    deploy("grpc-slow", tiny_args(tiny_registry, replicas=1, request_timeout_s=0.01))
    headers = {"application": "grpc-slow"}
    assert wait_for(lambda: routed(client, headers), timeout=60)
    yield headers
    ray_internals.delete_app_in_background("grpc-slow")


def test_a_prediction_over_the_timeout_is_deadline_exceeded(client, slow_app):
    status, message = error_of(client.infer, "alpha", [bytes_input("text", b"hello")], headers=slow_app)
    assert status == "StatusCode.DEADLINE_EXCEEDED" and message == "Model 'alpha' did not answer within 0.01s"
    assert client.is_server_live(headers=slow_app)


# -- the API key -------------------------------------------------------------------------------------------


def test_every_rpc_but_the_health_probes_needs_the_api_key(client):
    text = [bytes_input("text", b"hello")]
    calls = [
        (client.infer, ("alpha", text)),
        (client.get_server_metadata, ()),
        (client.get_model_metadata, ("alpha",)),
        (client.is_model_ready, ("alpha",)),
        (client.get_model_repository_index, ()),
        (client.load_model, ("alpha",)),
        (client.unload_model, ("alpha",)),
    ]
    for key in (None, "not-the-key"):
        headers = {"application": "limits", **({"authorization": f"Bearer {key}"} if key else {})}
        for call, args in calls:
            status, message = error_of(call, *args, headers=headers)
            assert status == "StatusCode.UNAUTHENTICATED" and "missing or wrong API key" in message, call
        assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert labels(client.infer("alpha", text, headers=LIMITS))[0].startswith("alpha-")
    assert client.get_model_metadata("alpha", headers=LIMITS, as_json=True)["name"] == "alpha"


def test_load_and_unload_need_the_admin_key(client):
    for call in (client.load_model, client.unload_model):
        status, message = error_of(call, "gamma", headers=LIMITS)
        assert status == "StatusCode.PERMISSION_DENIED" and "admin key" in message
    client.load_model("gamma", headers=LIMITS_ADMIN)
    assert client.is_model_ready("gamma", headers=LIMITS)
    client.unload_model("gamma", headers=LIMITS_ADMIN)
    assert wait_for(lambda: not client.is_model_ready("gamma", headers=LIMITS))


def test_the_keys_are_never_logged(client):
    from serve_app.core import ray_internals

    client.infer("alpha", [bytes_input("text", b"hello")], headers=LIMITS)
    client.get_model_repository_index(headers=LIMITS_ADMIN)
    leaked = []
    for path in glob.glob(f"{ray_internals.logs_dir()}/**/*", recursive=True):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (IsADirectoryError, PermissionError, FileNotFoundError):
            continue
        leaked += [path for key in (API_KEY, ADMIN_KEY) if key.encode() in data]
    assert not leaked, leaked
