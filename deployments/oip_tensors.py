"""Tensors of the Open Inference Protocol (KServe V2) over REST: JSON data and the binary tensor data extension.

An infer request is a JSON header, optionally followed by the raw bytes of some inputs: the header's length is in
``Inference-Header-Content-Length`` and each such input says how many bytes it takes with
``parameters.binary_data_size``. Outputs go back the same way when asked (``binary_data_output`` for all of them,
``binary_data`` per output). ``BYTES`` elements travel as a 4-byte little-endian length followed by the bytes.
Everything here is numpy only and raises ``ApiError`` (400) for a malformed request.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .inputs import ApiError

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
        dtype = _dtype(tensor.datatype, tensor.name)
        if any(d < 0 for d in tensor.shape):
            raise ApiError(400, "bad_infer_request", f"input {tensor.name!r}: negative dimension in {tensor.shape}")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ApiError(
                    400, "bad_infer_request", f"input {tensor.name!r}: binary_data_size {size!r} exceeds the body"
                )
            inputs[tensor.name] = _from_binary(tensor, dtype, binary[offset : offset + size])
            offset += size
        elif tensor.data is not None:
            inputs[tensor.name] = _from_json(tensor, dtype)
        else:
            raise ApiError(400, "bad_infer_request", f"input {tensor.name!r} has neither data nor binary_data_size")
    if offset != len(binary):
        raise ApiError(400, "bad_infer_request", f"{len(binary) - offset} bytes of binary data belong to no input")
    return ParsedRequest(header, inputs)


def _dtype(datatype: str, name: str) -> np.dtype:
    if datatype not in DTYPES:
        raise ApiError(400, "bad_infer_request", f"input {name!r}: unknown datatype {datatype!r}")
    return DTYPES[datatype]


def _count(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _from_binary(tensor: _Tensor, dtype: np.dtype, raw: bytes) -> np.ndarray:
    if dtype.kind == "O":
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ApiError(400, "bad_infer_request", f"input {tensor.name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise ApiError(400, "bad_infer_request", f"input {tensor.name!r}: truncated BYTES element")
            elements.append(raw[offset : offset + length])
            offset += length
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
    else:
        if len(raw) != _count(tensor.shape) * dtype.itemsize:
            raise ApiError(
                400,
                "bad_infer_request",
                f"input {tensor.name!r}: {len(raw)} bytes of binary data, but {tensor.datatype} {tensor.shape} "
                f"needs {_count(tensor.shape) * dtype.itemsize}",
            )
        array = np.frombuffer(raw, dtype=dtype)
    return _reshaped(array, tensor)


def _from_json(tensor: _Tensor, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "O":
        flat = list(_flatten(tensor.data))
        if not all(isinstance(x, str) for x in flat):
            raise ApiError(400, "bad_infer_request", f"input {tensor.name!r}: BYTES data must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [x.encode("utf-8") for x in flat]
    else:
        try:
            array = np.asarray(tensor.data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            raise ApiError(
                400, "bad_infer_request", f"input {tensor.name!r}: data is not {tensor.datatype}: {_short(e)}"
            ) from e
    return _reshaped(array, tensor)


def _reshaped(flat: np.ndarray, tensor: _Tensor) -> np.ndarray:
    if flat.size != _count(tensor.shape):
        raise ApiError(
            400,
            "bad_infer_request",
            f"input {tensor.name!r}: {flat.size} elements do not fill shape {tensor.shape}",
        )
    return flat.reshape(tensor.shape)


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
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise ApiError(400, "bad_infer_request", f"unknown output(s) {unknown}; this model has {sorted(outputs)}")
    described, chunks = [], []
    for name, parameters in wanted.items():
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if parameters.get("binary_data", binary_default):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
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
