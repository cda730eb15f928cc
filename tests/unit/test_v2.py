"""Open Inference Protocol bodies: JSON and binary tensors in, label and score tensors out."""

import json
import struct

import pytest

from deployments.ingress.protocols.v2 import InferRequest, RequestOutput, infer_response, parse_infer_request
from serve_app.core.errors import InvalidInput
from serve_app.core.registry import ModelSpec
from tests.helpers import inference_result


def _binary(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_json_bytes_tensor():
    body = json.dumps(
        {"id": "r1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["good", "bad"]}]}
    ).encode()
    request, elements = parse_infer_request(body, None)
    assert request.id == "r1" and elements == ["good", "bad"]


def test_binary_tensor_extension():
    data = _binary([b"good", b"\xff\xd8 jpeg bytes"])
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}]}
    ).encode()
    _, elements = parse_infer_request(header + data, str(len(header)))
    assert elements == [b"good", b"\xff\xd8 jpeg bytes"]


def test_an_input_with_its_data_both_in_json_and_in_binary_form_is_refused():
    """Which would it be? Triton refuses it; the binary elements were taken and the JSON dropped."""
    data = _binary([b"good"])
    tensor = {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["x"], "parameters": {"binary_data_size": 8}}
    header = json.dumps({"inputs": [tensor]}).encode()
    with pytest.raises(InvalidInput, match="has its data both in JSON and in binary form"):
        parse_infer_request(header + data, str(len(header)))


def test_an_output_named_twice_is_refused():
    from deployments.ingress.dataplane import check_outputs
    from serve_app.core.tasks import TaskCatalog

    task = TaskCatalog.load().get("text-classification")
    check_outputs(task, ["label", "score"])
    with pytest.raises(InvalidInput, match="output label is named twice"):
        check_outputs(task, ["label", "score", "label"])


@pytest.mark.parametrize("parameters", [{"classification": 2}, {"shared_memory_region": "r", "binary_data": True}])
def test_an_output_asked_with_a_parameter_of_a_triton_extension_this_server_lacks_is_refused(parameters):
    """Triton's classification extension, shared memory: honoured by Triton, not here, so refused, not
    answered as if not asked; ``binary_data`` is read, and a hint such as MLServer's ``content_type`` let be."""
    import asyncio

    from deployments.ingress.protocols.v2 import BodyParser

    def parse(output: dict) -> list[str]:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "outputs": [output]}
        return asyncio.run(BodyParser(json.dumps(body).encode(), None, 32)()).outputs

    name = next(iter(sorted(set(parameters) - {"binary_data"})))
    with pytest.raises(InvalidInput, match=f"output 'label': parameter '{name}' is not supported"):
        parse({"name": "label", "parameters": parameters})
    assert parse({"name": "label", "parameters": {"binary_data": True}}) == ["label"]
    assert parse({"name": "label", "parameters": {"content_type": "str"}}) == ["label"]  # MLServer's codec hint


@pytest.mark.parametrize("size", [-1, 10_000, "12", 1.5])
def test_a_binary_size_that_does_not_fit_is_refused(size):
    data = _binary([b"good"])
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]}
    ).encode()
    with pytest.raises(InvalidInput, match="binary_data_size"):
        parse_infer_request(header + data, str(len(header)))


@pytest.mark.parametrize(
    "body, header, match",
    [
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}', None, "BYTES"),
        (b'{"inputs": []}', None, "inputs"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}', None, "no data"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', "9999", "does not fit"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', "abc", "not a number"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [null]}]}', None, "string, not null"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", 1]}]}', None, "not a number"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [true]}]}', None, "not a boolean"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [{"a": 1}]}]}', None, "not an object"),
        (b'{"inputs": [{"name": "x", "shape": [true], "datatype": "BYTES", "data": ["a"]}]}', None, "shape"),
        (b'{"inputs": [{"name": "x", "shape": ["1"], "datatype": "BYTES", "data": ["a"]}]}', None, "shape"),
    ],
)
def test_bad_requests_are_invalid_input(body, header, match):
    with pytest.raises(InvalidInput, match=match):
        parse_infer_request(body, header)


def test_response_tensors_and_requested_outputs():
    request = InferRequest.model_validate(
        {
            "id": "7",
            "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
            "outputs": [{"name": "label"}],
        }
    )
    spec = ModelSpec(id="spam", task="text-classification", source={"path": "models/spam"})
    predictions = inference_result(spec, [[("spam", 0.9), ("ham", 0.1)]])
    response, binary = infer_response(request, predictions)
    assert binary == b"" and response.id == "7" and [o.name for o in response.outputs] == ["label"]
    assert response.outputs[0].data == ["spam"] and response.outputs[0].shape == [1]
    unknown = request.model_copy(update={"outputs": [RequestOutput(name="probabilities")]})
    with pytest.raises(InvalidInput, match="unknown output"):
        infer_response(unknown, predictions)


def test_binary_elements_past_the_limit_are_refused_at_the_first_one_past_it():
    data = _binary([b""] * 1_000)
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1000], "datatype": "BYTES", "parameters": {"binary_data_size": len(data)}}]}
    ).encode()
    with pytest.raises(InvalidInput, match="more than the limit of 32 elements"):
        parse_infer_request(header + data, str(len(header)), max_items=32)


def test_a_json_body_past_its_value_budget_is_refused_while_it_is_read():
    body = (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ['
        + b",".join([b"[]"] * 10_000)
        + b"]}]}"
    )
    with pytest.raises(InvalidInput, match="more JSON values than one input tensor of at most 4 elements needs"):
        parse_infer_request(body, None, max_items=4)


@pytest.mark.parametrize("timeout, expected", [(None, None), (250_000, 0.25)])
def test_the_clients_timeout_parameter_is_its_deadline(timeout, expected):
    from deployments.ingress.protocols.v2 import client_timeout_s

    parameters = {} if timeout is None else {"timeout": timeout}
    request = InferRequest.model_validate(
        {"parameters": parameters, "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    )
    assert client_timeout_s(request) == expected
    for bad in ("soon", 0, 2**64, 10**400):  # a number of 400 digits overflows a float
        with pytest.raises(InvalidInput, match=r"parameters\.timeout"):
            client_timeout_s(request.model_copy(update={"parameters": {"timeout": bad}}))
    assert client_timeout_s(request.model_copy(update={"parameters": {"timeout": 2**64 - 1}})) > 0


@pytest.mark.parametrize(
    "shape, data",
    [([-7, 99999999999], ["a"]), ([2], ["a"]), ([1, 2], ["a", "b", "c"]), ([], ["a", "b"]), ([0, 5], ["a"])],
)
def test_a_shape_that_disagrees_with_its_data_is_a_malformed_request(shape, data):
    from serve_app.core.errors import MalformedRequest

    body = json.dumps({"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": data}]}).encode()
    with pytest.raises(MalformedRequest, match="shape") as e:
        parse_infer_request(body, None, 32)
    assert e.value.status_code == 400
    ok = json.dumps({"inputs": [{"name": "text", "shape": [1, len(data)], "datatype": "BYTES", "data": data}]})
    assert parse_infer_request(ok.encode(), None, 32)[1] == data


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [], "parameters": {"a": NaN}}', b'{"a": Infinity}', b'{"a": 1} x', b"[" + b"9" * 5000 + b"]"],
)
def test_a_body_that_is_not_json_is_refused_by_the_bounded_reader(body):
    from serve_app.core.errors import MalformedRequest

    with pytest.raises(MalformedRequest, match="not valid JSON") as e:
        parse_infer_request(body, None, 32)
    assert e.value.status_code == 400


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\udc00", rb"a\ud800b"])
def test_a_lone_surrogate_is_a_body_that_is_not_json_for_both_apis(escape):
    """yajl reads a lone high surrogate and pydantic's parser does not (a lone low one neither reads): each
    is the 400 of a body that is not JSON, never the 422 of a field."""
    from deployments.ingress.protocols.native import parse_predict_request
    from serve_app.core.errors import MalformedRequest

    native = b'{"model_id": "m", "input_data": "' + escape + b'"}'
    v2 = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["' + escape + b'"]}]}'
    for parse in (lambda: parse_predict_request(native, 32), lambda: parse_infer_request(v2, None, 32)):
        with pytest.raises(MalformedRequest, match="the request body is not valid JSON") as e:
            parse()
        assert e.value.status_code == 400
    pair = rb"\ud800\udc00"  # a surrogate pair is one character
    assert parse_predict_request(native.replace(escape, pair), 32).input_data == "\U00010000"
    assert parse_infer_request(v2.replace(escape, pair), None, 32)[1] == ["\U00010000"]


@pytest.mark.parametrize("binary_data_output", [True, False])
def test_outputs_asked_for_in_binary_form_come_as_tritonclient_reads_them(binary_data_output):
    """tritonclient asks for every output in binary form by default (``binary_data_output``, and each output's
    ``binary_data``): the answer's JSON then names each one's ``binary_data_size``, and their bytes follow it,
    which its ``InferResult`` reads: BYTES as bytes (over JSON they were str, whose ``.decode()`` fails)."""
    import numpy as np
    import tritonclient.http as triton

    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a", b"b"], dtype=object), binary_data=False)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary_data_output) for n in ("label", "score")]
    body, json_size = triton.InferenceServerClient.generate_request_body([text], outputs=outputs)
    request, _ = parse_infer_request(body, str(json_size) if json_size else None)
    spec = ModelSpec(id="spam", task="text-classification", source={"path": "models/spam"})
    response, binary = infer_response(request, inference_result(spec, [[("spam", 0.9)], [("ham", 0.75)]]))
    header = response.model_dump_json(exclude_none=True).encode()
    result = triton.InferResult.from_response_body(header + binary, header_length=len(header) if binary else None)
    labels, scores = result.as_numpy("label"), result.as_numpy("score")
    assert scores.dtype == np.float32 and scores.tolist() == [0.8999999761581421, 0.75]
    if binary_data_output:
        assert labels.tolist() == [b"spam", b"ham"] and [o.data for o in response.outputs] == [None, None]
    else:
        assert binary == b"" and labels.tolist() == ["spam", "ham"]
