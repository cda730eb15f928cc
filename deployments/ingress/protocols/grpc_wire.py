"""How the gRPC service's request messages reach the app: as their bytes, decoded here within bounds.

Ray Serve's gRPC servers decode each request message with the deserializer its service registers, on the
replica's event loop, before any code of the app runs. tritonclient's ``ModelInferRequest.FromString``
turns 8 MiB of small fields (a million ``parameters`` entries, four million empty input tensors) into as
many objects: about 0.2 to 1.2 s of the ingress's CPU, measured, before the app could count anything, and
the app's own reading of the parameters (``MessageToDict`` per entry) cost as much again. So the app
registers the service itself (``add_servicer``, the servicer function in serve_config.yaml's
``grpc_options``): tritonclient's handlers, except that every RPC hands its message to the Ingress as
bytes, and the app decodes it: whole for the RPCs of scalar fields, and as below for those whose messages
hold repeated fields (``RAW_RPCS``). The transport refuses a message over
``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` (config/serve.env: ``max_body_bytes``) before it is read; the app
refuses one over ``max_body_bytes`` by its length; ``BoundedDecoder`` decodes the rest in one pass:

1. each message that holds message fields is read as an *envelope*: a message of the same field numbers
   whose message fields (map entries, input tensors) are plain ``bytes``, one slice each;
2. every repeated field's count is checked against its limit (``LIMITS``) before anything is built
   from it; a message field given twice (protobuf would merge the two) is refused;
3. the message is built from the envelope: scalars copied, nested messages decoded the same way from
   their slices, map entries and messages of scalars only decoded whole (their size is all they cost).

Each byte is read once, so a message costs what its size allows at most: about 4 million fields in
8 MiB, the worst case measured in docs/errors-and-limits.md. Unknown fields of the enveloped messages are
dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from serve_app.core.errors import InputOverLimit, MalformedRequest, ServeAppError

RAW_RPCS = {
    "ModelInfer": pb.ModelInferRequest,
    "ModelStreamInfer": pb.ModelInferRequest,  # never read: the app does not serve it
    "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
    "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
}
"""The RPCs whose request messages hold repeated fields: decoded within bounds (``BoundedDecoder``). The others
hold scalars only, so decoding them costs what their size allows, as reading them does (``decode_scalars``)."""


def decode_scalars(rpc: str, data: bytes) -> Message:
    """The request of an RPC of scalar fields (``ServerLive``, ``ModelMetadata``, ...), from its bytes;
    MalformedRequest (INVALID_ARGUMENT) for bytes that are not its message."""
    message: type[Message] = getattr(pb, f"{rpc}Request")
    try:
        return message.FromString(data)
    except DecodeError:
        raise MalformedRequest(
            f"the request is not a valid {message.DESCRIPTOR.name} message", field="request"
        ) from None


MAX_TENSORS = 16
"""Most input tensors, output tensors or ``raw_input_contents`` entries of one request (a model takes one
input tensor: more are refused with the protocol's message, up to this many)."""
MAX_PARAMETERS = 64
"""Most entries of a ``parameters`` map (the request's, a tensor's): Triton's clients send a handful."""
MAX_DIMENSIONS = 16
"""Most dimensions of a tensor's shape."""

LIMITS: Mapping[str, int] = {
    "inference.ModelInferRequest.inputs": MAX_TENSORS,
    "inference.ModelInferRequest.outputs": MAX_TENSORS,
    "inference.ModelInferRequest.raw_input_contents": MAX_TENSORS,
    "inference.ModelInferRequest.InferInputTensor.shape": MAX_DIMENSIONS,
}
"""The most entries of each repeated field, by full name; ``parameters`` maps and any other repeated field:
MAX_PARAMETERS; the typed contents of a tensor (``InferTensorContents``): the app's ``max_list_items``."""
_CONTENTS = "inference.InferTensorContents"


def add_servicer(servicer: Any, server: Any) -> None:
    """Register ``inference.GRPCInferenceService`` on a gRPC server as tritonclient's generated function does,
    with every RPC's request handed over as its bytes (Serve's servicer function: serve_config.yaml's
    ``grpc_options.grpc_servicer_functions``). The RPCs of ``RAW_RPCS`` are decoded within bounds, the others
    whole (``decode_scalars``), by the app. Bytes also cross from Serve's gRPC proxy to an ingress replica
    where a message could not: without direct ingress (``serve run serve_config.yaml`` without
    config/serve.env) the proxy pickles the request, and tritonclient's classes name a module,
    ``grpc_service_pb2``, that pickle cannot import."""
    recorder = _Recorder()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, recorder)
    name, handlers = recorder.registered
    handlers = {method: handler._replace(request_deserializer=None) for method, handler in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio 1.63 and later
        server.add_registered_method_handlers(name, handlers)


class _Recorder:
    """Stands for the server while tritonclient's function registers the service: keeps its handlers."""

    registered: tuple[str, dict[str, grpc.RpcMethodHandler]]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered = (name, dict(handlers))


# -- bounded decoding -----------------------------------------------------------------------------------


def _has_message_fields(desc: Descriptor) -> bool:
    return any(f.type == FieldDescriptor.TYPE_MESSAGE for f in desc.fields)


@functools.cache
def _envelopes(root: str) -> dict[str, type[Message]]:
    """The envelope class of every message type reachable from ``root`` (a full name) that holds message
    fields: the same fields, each message field read as ``repeated bytes``, enums as int32. Built once per
    process, in a pool of its own."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"mms_envelopes_{root}.proto", package=f"mms_envelope.{root}", syntax="proto3"
    )
    names: dict[str, str] = {}
    todo = [pb.DESCRIPTOR.pool.FindMessageTypeByName(root)]
    while todo:
        desc = todo.pop()
        if desc.full_name in names or not _has_message_fields(desc) or desc.GetOptions().map_entry:
            continue
        names[desc.full_name] = name = desc.full_name.replace(".", "_")
        message = file.message_type.add(name=name)
        for f in desc.fields:
            field = message.field.add(name=f.name, number=f.number, json_name=f.json_name)
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                field.type, field.label = FieldDescriptor.TYPE_BYTES, FieldDescriptor.LABEL_REPEATED
                todo.append(f.message_type)
            else:
                field.type = FieldDescriptor.TYPE_INT32 if f.type == FieldDescriptor.TYPE_ENUM else f.type
                field.label = FieldDescriptor.LABEL_REPEATED if f.is_repeated else FieldDescriptor.LABEL_OPTIONAL
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    classes = message_factory.GetMessageClassesForFiles([file.name], pool)
    return {full: classes[f"{file.package}.{name}"] for full, name in names.items()}


class BoundedDecoder:
    """Decodes one message type from its bytes within ``LIMITS`` (module docstring). ``max_items``: the most
    elements of a tensor's typed contents."""

    def __init__(self, message: type[Message], max_items: int, too_many_elements: Callable[[int], ServeAppError]):
        self.message = message
        self.max_items = max_items
        self.too_many_elements = too_many_elements
        self._envelopes = _envelopes(message.DESCRIPTOR.full_name)

    def envelope(self, data: bytes) -> Message:
        """The message's envelope: its scalars (a model's name), its message fields as slices."""
        return self._parse(self._envelopes[self.message.DESCRIPTOR.full_name], data, self.message.DESCRIPTOR)

    def build(self, envelope: Message) -> Message:
        """The message an envelope holds, its counts checked before anything is built from them."""
        target = self.message()
        self._fill(self.message.DESCRIPTOR, envelope, target, "")
        return target

    def decode(self, data: bytes) -> Message:
        return self.build(self.envelope(data))

    # -- one message ------------------------------------------------------------------------------

    @staticmethod
    def _parse(cls: type[Message], data: bytes, desc: Descriptor) -> Message:
        try:
            return cls.FromString(data)
        except DecodeError:
            raise MalformedRequest(f"the request is not a valid {desc.name} message", field="request") from None

    def _limit(self, f: FieldDescriptor) -> int:
        if f.containing_type.full_name == _CONTENTS:
            return self.max_items
        return LIMITS.get(f.full_name, MAX_PARAMETERS)

    def _check_count(self, f: FieldDescriptor, count: int, where: str) -> None:
        limit = self._limit(f)
        if count > limit:
            if f.containing_type.full_name == _CONTENTS:
                raise self.too_many_elements(self.max_items)
            raise InputOverLimit(f"{where}: {count} entries, more than the {limit} this server takes", field=where)

    def _fill(self, desc: Descriptor, envelope: Message, target: Message, path: str) -> None:
        for f in desc.fields:
            values = getattr(envelope, f.name)
            where = path + f.name
            if f.is_repeated:
                self._check_count(f, len(values), where)
            if f.type != FieldDescriptor.TYPE_MESSAGE:
                if f.is_repeated:
                    getattr(target, f.name).extend(values)
                elif values:  # proto3 scalars: the default is no value
                    setattr(target, f.name, values)
            elif f.message_type.GetOptions().map_entry:
                self._fill_map(f, values, getattr(target, f.name))
            elif f.is_repeated:
                for i, data in enumerate(values):
                    self._message(f.message_type, data, getattr(target, f.name).add(), f"{where}[{i}].")
            elif values:
                if len(values) > 1:
                    raise MalformedRequest(f"{where} is given {len(values)} times, once at most", field=where)
                sub = getattr(target, f.name)
                sub.SetInParent()  # present, even when empty
                self._message(f.message_type, values[0], sub, f"{where}.")

    def _message(self, desc: Descriptor, data: bytes, target: Message, path: str) -> None:
        if desc.full_name in self._envelopes:
            self._fill(desc, self._parse(self._envelopes[desc.full_name], data, desc), target, path)
            return
        # Scalars only (a tensor's typed contents, a parameter): decoded whole, then counted.
        try:
            target.MergeFromString(data)
        except DecodeError:
            raise MalformedRequest(f"{path.rstrip('.')} is not a valid {desc.name} message", field=path) from None
        for f in desc.fields:
            if f.is_repeated:
                self._check_count(f, len(getattr(target, f.name)), path + f.name)

    @staticmethod
    def _fill_map(f: FieldDescriptor, entries: list[bytes], target: Any) -> None:
        entry_class = message_factory.GetMessageClass(f.message_type)
        value_is_message = f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
        for data in entries:
            try:
                entry = entry_class.FromString(data)
            except DecodeError:
                raise MalformedRequest(f"{f.name} holds an entry that is not valid", field=f.name) from None
            if value_is_message:
                target[entry.key].CopyFrom(entry.value)
            else:
                target[entry.key] = entry.value
