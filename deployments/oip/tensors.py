"""Tensors of the Open Inference Protocol (KServe V2) over REST: JSON data and the binary tensor data extension.

An infer request is a JSON header, optionally followed by the raw bytes of some inputs: the header's length is in
``Inference-Header-Content-Length`` and each such input says how many bytes it takes with
``parameters.binary_data_size``. Outputs go back the same way when asked (``binary_data_output`` for all of them,
``binary_data`` per output). ``BYTES`` elements travel as a 4-byte little-endian length followed by the bytes.
Everything here is numpy only and raises ``ApiError`` (400) for a malformed request.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ApiError

HEADER_LENGTH = "Inference-Header-Content-Length"

#: OIP datatype -> numpy dtype (little-endian, as the binary extension specifies). BYTES -> object arrays of bytes.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class _RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    """The JSON header of an infer request."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_RequestedOutput] | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """An infer request: its header and its inputs as numpy arrays, by name."""

    header: InferRequest
    inputs: dict[str, np.ndarray]


def parse_infer_request(body: bytes, header_length: str | None) -> ParsedRequest:
    """The request body (JSON, or JSON followed by binary tensor data) -> header and input arrays."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ApiError(
                400, "bad_infer_request", f"invalid {HEADER_LENGTH} {header_length!r} for a body of {len(body)} bytes"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = InferRequest.model_validate(json.loads(json_part))
    except (ValueError, ValidationError) as e:
        raise ApiError(400, "bad_infer_request", f"invalid infer request JSON: {_short(e)}") from e
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in header.inputs:
        if tensor.name in inputs:
            raise ApiError(400, "bad_infer_request", f"input {tensor.name!r} appears twice")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ApiError(
                    400, "bad_infer_request", f"input {tensor.name!r}: binary_data_size {size!r} exceeds the body"
                )
            raw = binary[offset : offset + size]
            inputs[tensor.name] = tensor_from_raw(tensor.name, tensor.datatype, tensor.shape, raw)
            offset += size
        elif tensor.data is not None:
            inputs[tensor.name] = tensor_from_values(
                tensor.name, tensor.datatype, tensor.shape, list(_flatten(tensor.data))
            )
        else:
            raise ApiError(400, "bad_infer_request", f"input {tensor.name!r} has neither data nor binary_data_size")
    if offset != len(binary):
        raise ApiError(400, "bad_infer_request", f"{len(binary) - offset} bytes of binary data belong to no input")
    return ParsedRequest(header, inputs)


def _dtype(name: str, datatype: str, shape: list[int]) -> np.dtype:
    if datatype not in DTYPES:
        raise ApiError(400, "bad_infer_request", f"input {name!r}: unknown datatype {datatype!r}")
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise ApiError(400, "bad_infer_request", f"input {name!r}: shape {shape} has a negative dimension or over 8")
    return DTYPES[datatype]


def _count(shape: list[int]) -> int:
    return math.prod(shape)  # Python ints: a hostile shape cannot overflow into a size that matches


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor's raw bytes (the binary extension's, or gRPC's ``raw_input_contents``) -> its array: little-endian
    elements, or for ``BYTES`` each element's 4-byte little-endian length and then its bytes."""
    dtype = _dtype(name, datatype, shape)
    if dtype.kind == "O":
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ApiError(400, "bad_infer_request", f"input {name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise ApiError(400, "bad_infer_request", f"input {name!r}: truncated BYTES element")
            elements.append(raw[offset : offset + length])
            offset += length
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
    else:
        if len(raw) != _count(shape) * dtype.itemsize:
            raise ApiError(
                400,
                "bad_infer_request",
                f"input {name!r}: {len(raw)} bytes of binary data, but {datatype} {shape} "
                f"needs {_count(shape) * dtype.itemsize}",
            )
        array = np.frombuffer(raw, dtype=dtype)
    return _reshaped(array, name, shape)


def tensor_from_values(name: str, datatype: str, shape: list[int], values: list[Any]) -> np.ndarray:
    """A tensor's elements, flat in row-major order (JSON ``data``, or gRPC's typed ``contents``) -> its array.
    ``BYTES`` elements are ``str`` (JSON, UTF-8 encoded here) or ``bytes`` (gRPC)."""
    dtype = _dtype(name, datatype, shape)
    if dtype.kind == "O":
        if not all(isinstance(x, (str, bytes)) for x in values):
            raise ApiError(400, "bad_infer_request", f"input {name!r}: BYTES data must be strings")
        array = np.empty(len(values), dtype=object)
        array[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in values]
    else:
        try:
            array = np.asarray(values, dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            raise ApiError(400, "bad_infer_request", f"input {name!r}: data is not {datatype}: {_short(e)}") from e
    return _reshaped(array, name, shape)


def _reshaped(flat: np.ndarray, name: str, shape: list[int]) -> np.ndarray:
    if flat.size != _count(shape):
        raise ApiError(400, "bad_infer_request", f"input {name!r}: {flat.size} elements do not fill shape {shape}")
    return flat.reshape(shape)


def _flatten(data: Any) -> Any:
    for x in data:
        if isinstance(x, list):
            yield from _flatten(x)
        else:
            yield x


def _short(e: Exception) -> str:
    text = str(e).replace("\n", " ")
    return text[:300]


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array."""
    kind_size = array.dtype.str[1:]  # "f4", "u1": byte order aside
    for name, dtype in DTYPES.items():
        if dtype.kind != "O" and dtype.str[1:] == kind_size:
            return name
    raise TypeError(f"no OIP datatype for {array.dtype}")


def check_outputs(wanted: Iterable[str], outputs: dict[str, np.ndarray]) -> None:
    """400 unless every output a request asks for is one the model has."""
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise ApiError(400, "bad_infer_request", f"unknown output(s) {unknown}; this model has {sorted(outputs)}")


def tensor_to_raw(array: np.ndarray) -> bytes:
    """An output's raw bytes (binary extension, gRPC ``raw_output_contents``): row-major, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, dict[str, str], str]:
    """The response body, its extra headers and its media type, with the outputs the request asked for, as
    binary data where it asked for that and as JSON ``data`` elsewhere."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    wanted = {o.name: o.parameters for o in request.outputs} if request.outputs else {name: {} for name in outputs}
    check_outputs(wanted, outputs)
    described, chunks = [], []
    for name, parameters in wanted.items():
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if parameters.get("binary_data", binary_default):
            raw = tensor_to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id is not None:
        header["id"] = request.id
    json_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return json_bytes, {}, "application/json"
    return b"".join([json_bytes, *chunks]), {HEADER_LENGTH: str(len(json_bytes))}, "application/octet-stream"
