"""The OIP tensor codec against tritonclient's own request encoder and response decoder (no Ray, no server)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton

from deployments.errors import ApiError
from deployments.oip.tensors import encode_infer_response, parse_infer_request


def _request(inputs: list[triton.InferInput], outputs: list[triton.InferRequestedOutput] | None = None):
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs, request_id="r1")
    return parse_infer_request(body, None if json_size is None else str(json_size))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_requests_parse(binary: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 16, 3), dtype=np.uint8)
    latents = np.random.default_rng(1).standard_normal((2, 8, 2, 1)).astype(np.float32)
    a = triton.InferInput("IMAGE", list(images.shape), "UINT8")
    a.set_data_from_numpy(images, binary_data=binary)
    b = triton.InferInput("LATENTS", list(latents.shape), "FP32")
    b.set_data_from_numpy(latents, binary_data=binary)
    parsed = _request([a, b])
    assert parsed.header.id == "r1"
    np.testing.assert_array_equal(parsed.inputs["IMAGE"], images)
    np.testing.assert_array_equal(parsed.inputs["LATENTS"], latents)


def test_bytes_elements_survive_the_binary_extension() -> None:
    files = np.array([b"\x89PNG\r\n\x1a\n\x00\xff", b"", b"abc"], dtype=object)
    inp = triton.InferInput("IMAGE_BYTES", [3], "BYTES")
    inp.set_data_from_numpy(files, binary_data=True)
    assert list(_request([inp]).inputs["IMAGE_BYTES"]) == list(files)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_decode_with_tritonclient(binary: bool) -> None:
    inp = triton.InferInput("IMAGE", [1, 16, 16, 3], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8), binary_data=False)
    wanted = [
        triton.InferRequestedOutput("LATENTS", binary_data=binary),
        triton.InferRequestedOutput("IMAGE", binary_data=binary),
    ]
    request = _request([inp], wanted).header
    latents = np.random.default_rng(2).standard_normal((1, 8, 1, 1)).astype(np.float32)
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(1, 16, 16, 3)
    body, headers, media = encode_infer_response("m.encode", "1", request, {"LATENTS": latents, "IMAGE": image})
    result = triton.InferResult.from_response_body(body, header_length=headers.get("Inference-Header-Content-Length"))
    np.testing.assert_array_equal(result.as_numpy("LATENTS"), latents)  # exact: JSON floats round-trip float32
    np.testing.assert_array_equal(result.as_numpy("IMAGE"), image)
    assert result.get_response()["id"] == "r1"
    assert media == ("application/octet-stream" if binary else "application/json")


@pytest.mark.parametrize(
    ("body", "header_length", "words"),
    [
        (
            b'{"inputs": [{"name": "A", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}',
            None,
            "exceeds",
        ),
        (b'{"inputs": [{"name": "A", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "A", "shape": [2], "datatype": "UINT8", "data": [1, 999]}]}', None, "not UINT8"),
        (b'{"inputs": [{"name": "A", "shape": [2], "datatype": "INT32"}]}', None, "neither data"),
        (b'{"inputs": []}', None, "invalid infer request"),
        (b"{}", "9", "Inference-Header-Content-Length"),
    ],
)
def test_malformed_requests_are_400(body: bytes, header_length: str | None, words: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_infer_request(body, header_length)
    assert err.value.status == 400 and words in err.value.message
