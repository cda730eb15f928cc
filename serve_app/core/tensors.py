"""Tensors as the Open Inference Protocol (KServe v2) has them: a name, a datatype, a shape, row-major data.

A worker replica answers each request with named numpy arrays (``WorkerResult.outputs``): each pickles as
one buffer, so an answer is cheap to send between replicas, and each maps one to one onto a v2 output
tensor. BYTES tensors are numpy object arrays whose elements are ``str`` (sent as UTF-8) or ``bytes``.
The protocol adapters turn them into JSON data (``json_data``), into the binary form of the binary tensor
extension and of gRPC's ``raw_output_contents`` (``raw_data``), or into gRPC's typed ``contents``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
"""The v2 datatypes and the numpy dtype that holds each."""

_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as v2 model metadata describes it: -1 for a dimension that varies."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype of an array (``ValueError`` for a dtype v2 has no name for)."""
    try:
        return _BY_DTYPE[array.dtype]
    except KeyError:
        raise ValueError(f"no v2 datatype holds numpy {array.dtype}") from None


def as_bytes(value: object) -> bytes:
    """One BYTES element as bytes: a str as UTF-8."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def bytes_array(values: Iterable[object], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A BYTES tensor of the given elements (str or bytes), flat or in ``shape``."""
    items = list(values)
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape) if shape is not None else array


def json_data(array: np.ndarray) -> list:
    """The tensor's elements, flattened in row-major order, as JSON values (BYTES as UTF-8 text)."""
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def pack_bytes(elements: Iterable[object]) -> bytes:
    """The binary form of BYTES data: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in map(as_bytes, elements))


def raw_data(array: np.ndarray) -> bytes:
    """The tensor's binary form (v2 binary data extension, gRPC ``raw_output_contents``): row-major,
    little-endian; BYTES as length-prefixed elements."""
    if array.dtype == object:
        return pack_bytes(array.reshape(-1))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
