"""The Open Inference Protocol (KServe v2), REST: bodies and tensor codecs, and what the gRPC adapter
(``v2_grpc.py``) shares with it: model metadata, model states, the input checks, the BYTES tensor codec
and the choice of outputs.

A model takes one BYTES input tensor, named after its task's input kind: ``text`` (UTF-8 strings) or
``image`` (encoded images: in JSON, base64 strings; with the binary tensor extension, raw bytes). Its
output tensors are its task's (``serve_app.core.outputs``), which model metadata describes: ``label`` and
``score`` for a classifier, ``embedding`` for feature extraction, the entities' tensors for token
classification.

Both JSON tensors and the binary tensor data extension (the
``Inference-Header-Content-Length`` header, used by default by Triton's
``tritonclient``) are accepted.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, StrictInt, ValidationError

from deployments.ingress.bodies import check_json_budget, not_json, parse_bounded
from deployments.ingress.dataplane import InferenceRequest, InferenceResult, ModelListing, check_outputs
from serve_app.core.errors import (
    InputOverLimit,
    InvalidInput,
    MalformedRequest,
    ModelVersionNotFound,
    echo,
    first_invalid,
)
from serve_app.core.registry import ModelSpec
from serve_app.core.schemas import ModelState
from serve_app.core.tasks import Task
from serve_app.core.tensors import datatype_of, json_data, pack_bytes, raw_data

SERVER_NAME = "multimodel-serve"
MODEL_VERSION = "1"
EXTENSIONS = ["model_repository"]

# The protocol's model states, from the data plane's.
STATE = {
    ModelState.LOADED: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "FAILED",
    ModelState.NOT_LOADED: "UNAVAILABLE",
}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None  # binary_data_size: its data follows the JSON, in binary form
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str = MODEL_VERSION
    id: str | None = None
    outputs: list[ResponseOutput]


class RepositoryModel(BaseModel):
    name: str
    version: str = MODEL_VERSION
    state: str = Field(description="READY, LOADING, UNAVAILABLE (not loaded) or FAILED")
    reason: str = ""
    size_bytes: int | None = Field(
        None, description="an extension of this server: what a copy takes, as measured (else as declared)"
    )


def check_version(name: str, version: str | None) -> None:
    """A request for a version of the model (a route's ``versions/{version}``, gRPC's ``model_version``):
    none, or the one it has (MODEL_VERSION); another is a 404 (gRPC NOT_FOUND), not an answer from this one."""
    if version not in (None, "", MODEL_VERSION):
        raise ModelVersionNotFound(name, version, [MODEL_VERSION])


def model_metadata(spec: ModelSpec, task: Task) -> ModelMetadata:
    """What a model takes and answers, from its task: the input kind's tensor, the output kind's tensors."""
    return ModelMetadata(
        name=spec.id,
        versions=[MODEL_VERSION],
        platform=f"{task.platform}/{task.name}" if spec.runtime is None else f"{spec.runtime}/{task.name}",
        inputs=[TensorMetadata(name=task.input.name, datatype=task.input.datatype, shape=[-1])],
        outputs=[TensorMetadata(name=o.name, datatype=o.datatype, shape=list(o.shape)) for o in task.output.outputs()],
    )


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def too_many_elements(max_items: int) -> InputOverLimit:
    return InputOverLimit(f"the input tensor has more than the limit of {max_items} elements", field="inputs")


def bytes_elements(buffer: bytes, max_items: int) -> list[bytes]:
    """BYTES tensor data in binary form: each element is a 4-byte little-endian length, then the bytes.
    Stops at the first element past ``max_items``."""
    items, offset = [], 0
    while offset < len(buffer):
        if len(items) == max_items:
            raise too_many_elements(max_items)
        if offset + 4 > len(buffer):
            raise MalformedRequest("binary BYTES tensor data is truncated", field="inputs")
        (n,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + n > len(buffer):
            raise MalformedRequest("binary BYTES tensor data is truncated", field="inputs")
        items.append(buffer[offset : offset + n])
        offset += n
    return items


def bytes_tensor(elements: Iterable[bytes]) -> bytes:
    """The binary form of BYTES tensor data (``bytes_elements`` reverses it)."""
    return pack_bytes(elements)


def check_input_tensor(count: int, name: str, datatype: str) -> None:
    """What every request must hold: one input tensor, of BYTES."""
    if count != 1:
        raise InvalidInput(f"this model takes one input tensor, got {count}", field="inputs")
    if datatype != "BYTES":
        raise InvalidInput(f"input {echo(name)} must be BYTES, not {echo(datatype, quote=False)}", field="inputs")


def no_data(name: str) -> InvalidInput:
    return InvalidInput(f"input {echo(name)} has no data", field="inputs")


def check_not_empty(name: str, elements: list) -> None:
    if not elements:
        raise InvalidInput(f"input {echo(name)} is empty", field="inputs")


def check_shape(name: str, shape: Sequence[int], count: int) -> None:
    """A tensor's shape must describe its data: no negative dimension, and as many elements as the
    dimensions multiply to (the protocol's rule; a shape that disagrees is a malformed request)."""
    if any(d < 0 for d in shape):
        raise MalformedRequest(
            f"input {echo(name)}: a shape has no negative dimension, got {_shape_text(shape)}", field="inputs"
        )
    product = 1
    for d in shape:
        product *= d
        if product > count:  # no need to multiply on: already more than the elements sent
            break
    if product != count:
        raise MalformedRequest(
            f"input {echo(name)}: shape {_shape_text(shape)} does not match its {count} element(s)", field="inputs"
        )


_JSON_KINDS = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (dict, "an object"), (type(None), "null"))


def check_bytes_elements(name: str, elements: list[Any]) -> None:
    """A BYTES tensor's JSON elements are strings: a number, a boolean, null or an object is no text to read
    (not turned into one: ``null`` would be classified as the text "None")."""
    for element in elements:
        if not isinstance(element, str):
            kind = next((text for cls, text in _JSON_KINDS if isinstance(element, cls)), type(element).__name__)
            raise InvalidInput(f"input {echo(name)}: a BYTES element is a string, not {kind}", field="inputs")


def _shape_text(shape: Sequence[int]) -> str:
    text = str(list(shape))
    return text if len(text) <= 80 else text[:80] + "...]"


def json_budget(max_items: int) -> int:
    """The most JSON values a well-formed infer request with ``max_items`` input elements needs."""
    return 64 + 4 * max_items


def parse_infer_request(
    body: bytes, header_length: str | None, max_items: int = 32
) -> tuple[InferRequest, list[str | bytes]]:
    """The request and the elements of its (single) input tensor, bounded while they are parsed."""
    try:
        json_end = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise MalformedRequest("Inference-Header-Content-Length is not a number", field="headers") from None
    if not 0 < json_end <= len(body):
        raise MalformedRequest("Inference-Header-Content-Length does not fit the body", field="headers")
    check_json_budget(body[:json_end], json_budget(max_items), f"one input tensor of at most {max_items} elements")
    try:
        request = InferRequest.model_validate_json(body[:json_end])
    except ValidationError as e:
        raise not_json(e) or first_invalid(e) from None
    tensor = request.inputs[0]
    check_input_tensor(len(request.inputs), tensor.name, tensor.datatype)
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None and tensor.data is not None:
        raise MalformedRequest(
            f"input {echo(tensor.name)} has its data both in JSON and in binary form (binary_data_size): one of them",
            field="inputs",
        )
    if binary_size is not None:
        if not isinstance(binary_size, int) or not 0 <= binary_size <= len(body) - json_end:
            raise MalformedRequest("binary_data_size does not fit the binary data sent", field="inputs")
        elements: list[str | bytes] = list(bytes_elements(body[json_end : json_end + binary_size], max_items))
    elif tensor.data is not None:
        elements = _flatten(tensor.data)
        check_bytes_elements(tensor.name, elements)
    else:
        raise no_data(tensor.name)
    check_not_empty(tensor.name, elements)
    check_shape(tensor.name, tensor.shape, len(elements))
    return request, elements


MAX_TIMEOUT_US = 2**64 - 1
"""The largest ``timeout`` Triton's clients send: an unsigned 64-bit count of microseconds."""


UNSERVED_OUTPUT_PARAMETERS = frozenset(
    {"classification", "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
)
"""Parameters of a requested output that ask for what this server does not do: Triton's classification
extension (``classification``: the top classes as ``score:index:label`` strings) and shared memory, whose
client would read its answer from a region this server never writes. Answered as if they were not there,
such a request got a 200 it did not ask for. Others are read (``binary_data``) or are hints an answer of
fixed datatypes does without (MLServer's ``content_type``)."""


def check_output_parameters(outputs: Iterable[tuple[str, Collection[str]]]) -> None:
    """``InvalidInput`` (422) for a requested output (its name, its parameters' names) with a parameter that
    asks for what this server does not do (UNSERVED_OUTPUT_PARAMETERS)."""
    for name, parameters in outputs:
        other = sorted(set(parameters) & UNSERVED_OUTPUT_PARAMETERS)
        if other:
            raise InvalidInput(
                f"output {echo(name)}: parameter {echo(other[0])} is not supported: every output is answered "
                "whole, in the response (no classification extension, no shared memory)",
                field="outputs",
            )


def timeout_from_parameters(parameters: dict[str, Any] | None) -> float | None:
    """A request's own deadline, in seconds: Triton's ``timeout`` request parameter, in microseconds."""
    timeout = (parameters or {}).get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_US:
        raise InvalidInput(
            f"parameters.timeout must be a positive number of microseconds, at most {MAX_TIMEOUT_US}",
            field="parameters",
        )
    return timeout / 1e6


def client_timeout_s(request: InferRequest) -> float | None:
    return timeout_from_parameters(request.parameters)


class BodyParser:
    """Parses an infer request's body when the data plane asks (through ``bodies.parse_bounded``);
    ``request`` is then the parsed request, for shaping the answer."""

    def __init__(
        self, body: bytes, header_length: str | None, max_items: int, model: tuple[str, str | None] = ("", None)
    ) -> None:
        """``model``: the model's name and the version the request names (``check_version``), checked once the
        data plane knows the model."""
        self._body, self._header_length, self._max_items = body, header_length, max_items
        self._model = model
        self.request: InferRequest | None = None

    async def __call__(self) -> InferenceRequest:
        check_version(*self._model)
        return await parse_bounded(self._parse, self._body)

    def _parse(self, body: bytes) -> InferenceRequest:
        self.request, elements = parse_infer_request(body, self._header_length, self._max_items)
        check_output_parameters((o.name, o.parameters or {}) for o in self.request.outputs or ())
        return InferenceRequest(
            inputs=elements,
            timeout_s=client_timeout_s(self.request),
            parameters=self.request.parameters,  # the task's among them (Triton's own, as timeout, are not)
            other_parameters=True,
            outputs=[o.name for o in self.request.outputs or ()],
        )


def server_metadata(version: str) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=version, extensions=EXTENSIONS)


def chosen_outputs(result: InferenceResult, wanted: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The task's output tensors by name, or those of them the request names (none: every one; the data plane
    refused an unknown name before the model ran: ``check_outputs``)."""
    tensors = result.v2()
    if wanted:
        check_outputs(result.task, wanted)
        tensors = {name: array for name, array in tensors.items() if name in wanted}
    return tensors


def binary_outputs(request: InferRequest, names: Collection[str]) -> set[str]:
    """The outputs a request asks for in binary form (the protocol's binary data extension): each output whose
    ``parameters.binary_data`` is true, and with the request's ``parameters.binary_data_output`` true, every
    output whose own parameter is not false (tritonclient asks so by default)."""
    default = (request.parameters or {}).get("binary_data_output") is True
    own = {o.name: (o.parameters or {}).get("binary_data") for o in request.outputs or ()}
    return {name for name in names if own.get(name) is True or (default and own.get(name) is not False)}


def infer_response(request: InferRequest, result: InferenceResult) -> tuple[InferResponse, bytes]:
    """The answer's JSON, and the binary data that follows it (empty when every output is JSON): the outputs
    asked for in binary form carry ``binary_data_size`` instead of ``data``, their bytes in output order
    (``raw_data``: row-major, little-endian, BYTES length-prefixed)."""
    tensors = chosen_outputs(result, {o.name for o in request.outputs or ()})
    binary = binary_outputs(request, tensors)
    outputs, blobs = [], []
    for name, array in tensors.items():
        shape, datatype = list(array.shape), datatype_of(array)
        if name in binary:
            blobs.append(raw_data(array))
            outputs.append(
                ResponseOutput(
                    name=name, shape=shape, datatype=datatype, parameters={"binary_data_size": len(blobs[-1])}
                )
            )
        else:
            outputs.append(ResponseOutput(name=name, shape=shape, datatype=datatype, data=json_data(array)))
    return InferResponse(model_name=result.spec.id, id=request.id, outputs=outputs), b"".join(blobs)


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="list only the models that are ready (loaded)")


def parse_repository_index_request(body: bytes) -> RepositoryIndexRequest:
    """The optional body of ``POST /v2/repository/index``: none, or ``{"ready": true}``."""
    if not body.strip():
        return RepositoryIndexRequest()
    check_json_budget(body, 8, "a repository index request")
    try:
        return RepositoryIndexRequest.model_validate_json(body)
    except ValidationError as e:
        raise not_json(e) or first_invalid(e) from None


def repository_index(listing: ModelListing, ready_only: bool = False) -> list[RepositoryModel]:
    """Every model with its state, or only the ready ones."""
    models = [m for m in listing.models if not ready_only or m.state is ModelState.LOADED]
    return [
        RepositoryModel(
            name=m.spec.id,
            state=STATE[m.state],
            reason=m.last_error or "",
            size_bytes=m.size_bytes or m.spec.memory_bytes,
        )
        for m in models
    ]
