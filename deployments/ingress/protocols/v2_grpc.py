"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, the service Triton, KServe
and MLServer speak, served by Ray Serve's gRPC proxy to the same ingress deployment as the REST routes.

Each RPC turns its protobuf request into one data-plane call and the data plane's typed answer into its
protobuf response; model lookup, input decoding, dispatch and the limits are the data plane's, and what
REST and gRPC share (metadata, model states, input checks, choice of outputs) is ``protocols/v2.py``'s.
The message classes are tritonclient's generated ``service_pb2``; Serve registers the service with
``SERVICER_FUNCTION`` (``grpc_options`` in serve_config.yaml).

* Auth: the API key of REST, as ``authorization: Bearer <key>`` metadata, through ``auth.authorize``;
  ServerLive and ServerReady are open, RepositoryModelLoad and RepositoryModelUnload need the admin key.
  With auth off, only callers on the loopback are served (``auth.require_loopback``): some of Serve's gRPC
  servers listen on every interface, whatever address the app's HTTP listens on.
* Limits: the data plane's (inputs per request, image bytes and pixels), and ``max_body_bytes`` on the
  request message, as REST has it on the body. The transport refuses a larger message unread
  (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, config/serve.env), and the messages that hold repeated fields reach
  the app as bytes, decoded within bounds on their counts (``grpc_wire``): no message within the limits
  costs more than its size allows.
* Inputs: one BYTES tensor, its elements in ``contents.bytes_contents`` or, in the binary BYTES form,
  in ``raw_input_contents``. Outputs are the model's task's tensors, and come back the way the inputs came:
  in ``raw_output_contents`` when the request used ``raw_input_contents`` (as ``tritonclient.grpc``
  does), else in each output's typed ``contents``.
* Errors: the RPC ends with the status ``GRPC_STATUS`` gives the error and the message REST gives it, and
  an error that says when to come again (a model in its load back-off) sends ``retry-after`` (seconds) as
  trailing metadata, as REST sends ``Retry-After``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from deployments.ingress.auth import ADMIN_RPCS, OPEN_RPCS, authorization_of, authorize, require_loopback
from deployments.ingress.bodies import parse_bounded
from deployments.ingress.dataplane import DataPlane, InferenceRequest, InferenceResult
from deployments.ingress.protocols import v2
from deployments.ingress.protocols.grpc_wire import RAW_RPCS, BoundedDecoder, decode_scalars
from serve_app.core.config import Keys
from serve_app.core.errors import (
    AdminKeyRequired,
    BadImage,
    ForbiddenPath,
    InvalidInput,
    LimitExceeded,
    LoopbackOnly,
    ModelChanged,
    ModelNotFound,
    ModelUnavailable,
    ModelVersionNotFound,
    PayloadTooLarge,
    RequestBodyTimeout,
    RequestTimeout,
    ServeAppError,
    Unauthorized,
    retry_after_s,
    unwrap,
)
from serve_app.core.tensors import as_bytes, datatype_of, raw_data

logger = logging.getLogger("ray.serve")

SERVICE = "inference.GRPCInferenceService"
SERVICER_FUNCTION = "deployments.ingress.protocols.grpc_wire.add_servicer"
"""Serve's servicer function for the service: tritonclient's registration, with the messages that hold repeated
fields handed to the app as bytes (``grpc_wire``)."""
API = "v2_grpc"
"""The ``api`` tag of the data plane's metrics for this protocol."""

GRPC_STATUS: dict[type[ServeAppError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelVersionNotFound: grpc.StatusCode.NOT_FOUND,
    ModelChanged: grpc.StatusCode.ABORTED,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    BadImage: grpc.StatusCode.INVALID_ARGUMENT,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestBodyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    AdminKeyRequired: grpc.StatusCode.PERMISSION_DENIED,
    ForbiddenPath: grpc.StatusCode.PERMISSION_DENIED,
    LoopbackOnly: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The one mapping of the app's errors to gRPC status codes. An error takes the status of the first of
its classes (most specific first) found here: an image over the byte limit is an InvalidInput and a
LimitExceeded, and answers RESOURCE_EXHAUSTED."""


def grpc_status(exc: ServeAppError) -> grpc.StatusCode:
    return next((GRPC_STATUS[c] for c in type(exc).__mro__ if c in GRPC_STATUS), grpc.StatusCode.INTERNAL)


class Context(Protocol):
    """What the adapter uses of the RPC's context (Ray Serve's ``RayServegRPCContext``)."""

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]: ...

    def peer(self) -> str: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None: ...


# -- requests and responses -----------------------------------------------------------------------------


def inference_request(request: pb.ModelInferRequest, max_items: int) -> InferenceRequest:
    """The request's one BYTES input tensor, its deadline (Triton's ``timeout`` parameter: microseconds, an
    int64 or a uint64; of another type, a bad request, as over REST) and its parameters, the task's among
    them."""
    timeout = request.parameters.get("timeout")
    deadline = v2.timeout_from_parameters({"timeout": parameter_value(timeout)} if timeout is not None else {})
    parameters = {name: parameter_value(p) for name, p in request.parameters.items() if name != "timeout"}
    inputs = input_elements(request, max_items)
    v2.check_output_parameters((o.name, o.parameters) for o in request.outputs)  # after the inputs, as over REST
    return InferenceRequest(
        inputs=inputs,
        timeout_s=deadline,
        parameters=parameters,
        other_parameters=True,
        outputs=[o.name for o in request.outputs],
    )


def parameter_value(parameter: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value: a bool, an int, a float or a string (None if it has none)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def input_elements(request: pb.ModelInferRequest, max_items: int) -> list[bytes]:
    """The elements of the request's one BYTES input tensor, from ``raw_input_contents`` or ``contents``."""
    count = len(request.inputs)
    tensor = request.inputs[0] if count else pb.ModelInferRequest.InferInputTensor()
    v2.check_input_tensor(count, tensor.name, tensor.datatype)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != count or tensor.HasField("contents"):
            raise InvalidInput(
                "raw_input_contents must hold one entry per input tensor, and no input its data in contents too",
                field="raw_input_contents",
            )
        elements = v2.bytes_elements(raw[0], max_items)
    elif tensor.HasField("contents"):
        if len(tensor.contents.bytes_contents) > max_items:
            raise v2.too_many_elements(max_items)
        elements = list(tensor.contents.bytes_contents)
    else:
        raise v2.no_data(tensor.name)
    v2.check_not_empty(tensor.name, elements)
    v2.check_shape(tensor.name, tensor.shape, len(elements))
    return elements


# Where an output tensor's data goes in a response's typed ``contents``, by datatype (FP16 has no such field:
# it always goes raw).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def infer_response(request: pb.ModelInferRequest, result: InferenceResult) -> pb.ModelInferResponse:
    """The output tensors the request asks for, raw if its inputs were raw (as ``tritonclient.grpc``
    sends them), else in each tensor's typed ``contents``."""
    tensors = v2.chosen_outputs(result, [o.name for o in request.outputs])
    datatypes = {name: datatype_of(array) for name, array in tensors.items()}
    raw = bool(request.raw_input_contents) or "FP16" in datatypes.values()  # all raw, or none (the protocol)
    response = pb.ModelInferResponse(model_name=result.spec.id, model_version=v2.MODEL_VERSION, id=request.id)
    for name, array in tensors.items():
        tensor = response.outputs.add(name=name, datatype=datatypes[name], shape=list(array.shape))
        if raw:
            response.raw_output_contents.append(raw_data(array))
        elif datatypes[name] == "BYTES":
            tensor.contents.bytes_contents.extend(as_bytes(v) for v in array.reshape(-1))
        else:
            getattr(tensor.contents, _CONTENTS[datatypes[name]]).extend(array.reshape(-1).tolist())
    return response


_M = TypeVar("_M", bound=Message)


def _message(body: Any, message: type[_M]) -> _M:
    """A REST body (pydantic) as the protobuf message of the same fields."""
    return json_format.ParseDict(body.model_dump() if hasattr(body, "model_dump") else body, message())


# -- the service --------------------------------------------------------------------------------------

_Rpc = Callable[[Any, Any, Context], Awaitable[Message]]


def rpc(response: type[Message]) -> Callable[[_Rpc], _Rpc]:
    """An RPC of the service, named as the method: its caller's key checked, its message size too, and an
    error answered with its status and message (and an empty ``response``)."""

    def wrap(method: _Rpc) -> _Rpc:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: V2Grpc, request: Message | bytes, context: Context) -> Message:
            try:
                require_loopback(self.keys, context.peer())
                if name not in OPEN_RPCS:
                    authorization = authorization_of(context.invocation_metadata(), "authorization")
                    authorize(self.keys, authorization, name in ADMIN_RPCS)
                if name in RAW_RPCS and isinstance(request, Message):  # an in-process caller's message
                    request = request.SerializeToString()
                size = len(request) if isinstance(request, bytes) else request.ByteSize()
                if size > self.max_message_bytes:
                    raise PayloadTooLarge(self.max_message_bytes)
                if name not in RAW_RPCS and isinstance(request, bytes):
                    request = decode_scalars(name, request)
                return await method(self, request, context)
            except Exception as e:
                inner = unwrap(e)
                if isinstance(inner, ServeAppError):
                    code, details = grpc_status(inner), inner.message
                    retry = retry_after_s(inner)
                    if retry is not None:
                        context.set_trailing_metadata([("retry-after", str(retry))])
                else:
                    logger.exception("unhandled error in %s: %s", name, e)  # the details go to the log
                    code, details = grpc.StatusCode.INTERNAL, f"internal error ({type(inner).__name__})"
                context.set_code(code)
                context.set_details(details)
                return response()

        return handler

    return wrap


class V2Grpc:
    """``inference.GRPCInferenceService`` over the data plane. The ingress deployment's methods of the same
    names delegate here: Ray Serve calls the deployment method named as the RPC."""

    def __init__(self, plane: DataPlane, keys: Keys, max_message_bytes: int, version: str, max_items: int = 32) -> None:
        self.plane = plane
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.version = version
        self.max_items = max_items
        self.decoders = {
            name: BoundedDecoder(message, max_items, v2.too_many_elements) for name, message in RAW_RPCS.items()
        }

    async def _decode(self, name: str, data: bytes) -> Message:
        """A raw RPC's message, decoded within bounds (on the event loop when small, else in a thread)."""
        return await parse_bounded(self.decoders[name].decode, data)

    @rpc(pb.ServerLiveResponse)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc(pb.ServerReadyResponse)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=(await self.plane.ready()).ready)

    @rpc(pb.ServerMetadataResponse)
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return _message(v2.server_metadata(self.version), pb.ServerMetadataResponse)

    @rpc(pb.ModelReadyResponse)
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        self.plane.spec(request.name)
        v2.check_version(request.name, request.version)
        return pb.ModelReadyResponse(ready=(await self.plane.model(request.name)).loaded)

    @rpc(pb.ModelMetadataResponse)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        spec = self.plane.spec(request.name)
        v2.check_version(request.name, request.version)
        return _message(v2.model_metadata(spec, self.plane.task(spec)), pb.ModelMetadataResponse)

    @rpc(pb.ModelInferResponse)
    async def ModelInfer(self, request: bytes, context: Context) -> pb.ModelInferResponse:
        # The inputs are read once the model is known, as REST does: an unknown model is NOT_FOUND whatever
        # the request holds. Its envelope (one pass over the message's top level) names the model; the rest is
        # counted and built from it once the model is known.
        decoder = self.decoders["ModelInfer"]
        envelope = await self.plane.parsed(API, parse_bounded(decoder.envelope, request))
        message = None

        def parse(_: bytes) -> InferenceRequest:
            nonlocal message
            v2.check_version(envelope.model_name, envelope.model_version)  # the model is known by now
            message = decoder.build(envelope)
            return inference_request(message, self.max_items)

        result = await self.plane.infer(envelope.model_name, functools.partial(parse_bounded, parse, request), api=API)
        return infer_response(message, result)

    @rpc(pb.RepositoryIndexResponse)
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        models = v2.repository_index(await self.plane.models(), ready_only=request.ready)
        # The gRPC index has fixed fields: the size is REST's extension only.
        fields = ("name", "version", "state", "reason")
        return _message({"models": [m.model_dump(include=set(fields)) for m in models]}, pb.RepositoryIndexResponse)

    @rpc(pb.RepositoryModelLoadResponse)
    async def RepositoryModelLoad(self, request: bytes, context: Context) -> pb.RepositoryModelLoadResponse:
        message = await self._decode("RepositoryModelLoad", request)
        await self.plane.load(message.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc(pb.RepositoryModelUnloadResponse)
    async def RepositoryModelUnload(self, request: bytes, context: Context) -> pb.RepositoryModelUnloadResponse:
        message = await self._decode("RepositoryModelUnload", request)
        await self.plane.unload(message.model_name)
        return pb.RepositoryModelUnloadResponse()


IMPLEMENTED = frozenset(name for name, value in vars(V2Grpc).items() if hasattr(value, "__wrapped__"))


async def unimplemented(self: Any, request: bytes, grpc_context: Context) -> Message:
    """The service's RPCs this app does not serve (model configuration and statistics, shared memory,
    trace and log settings): UNIMPLEMENTED, as a gRPC server answers an RPC it lacks."""
    grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    grpc_context.set_details(f"this server implements only these RPCs of {SERVICE}: {', '.join(sorted(IMPLEMENTED))}")
    return Empty()  # an empty message: the same bytes as any RPC's empty response


async def unimplemented_stream(self: Any, request_stream: Any, grpc_context: Context):
    """ModelStreamInfer (a bidirectional stream): UNIMPLEMENTED, with no message."""
    await unimplemented(self, request_stream, grpc_context)
    return
    yield  # an async generator: Ray Serve streams what it yields
