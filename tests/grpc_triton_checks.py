"""The Open Inference Protocol over gRPC, checked with tritonclient.grpc against the apps ``test_serve_ops.py``
started (Serve's gRPC proxy at ``VTP_TEST_GRPC_TARGET``). Not collected on its own (no ``test_`` prefix):
``test_serve_ops.test_tritonclient_grpc`` runs it in a pytest of its own, because tritonclient.grpc and kserve
cannot be imported in one process (both register the protocol's ``inference.*`` protobuf messages)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from helpers import SIZE, TINY, TINYTEXT, model_inputs, png_bytes, random_image
from tritonclient.utils import InferenceServerException

from vtp_ray import VTPReplica
from vtp_ray.images import preprocess

TARGET = os.environ.get("VTP_TEST_GRPC_TARGET")
pytestmark = pytest.mark.skipif(TARGET is None, reason="run by test_serve_ops.test_tritonclient_grpc")

KEY = "grpc-test-key"  # test_serve_ops.KEY
WIDE_CHANNELS = 12
OPS = {"application": "ops"}


@pytest.fixture(scope="module")
def grpc_client() -> Iterator[triton_grpc.InferenceServerClient]:
    c = triton_grpc.InferenceServerClient(TARGET)
    yield c
    c.close()


@pytest.fixture(scope="module")
def replicas() -> dict[str, VTPReplica]:
    return {
        "tiny": VTPReplica(TINY, device="cpu", warmup_size=0),
        "wide": VTPReplica(os.environ["VTP_TEST_WIDE_CHECKPOINT"], device="cpu", warmup_size=0),
    }


def test_grpc_every_listed_model_answers_metadata_and_infer(grpc_client: triton_grpc.InferenceServerClient) -> None:
    """Every model the repository index lists answers metadata and an infer over gRPC (test_serve_ops checks the
    same over REST); text.embed_text equals the replica's text embeddings."""
    listed = [m.name for m in grpc_client.get_model_repository_index(headers=OPS).models]
    assert "text.embed_text" in listed and "tiny.embed_text" not in listed
    texts = ["a photo of a cat", "un chat \u00e9l\u00e9gant"]
    for name in listed:
        meta = grpc_client.get_model_metadata(name, headers=OPS)
        spec = meta.inputs[0]
        if spec.name == "TEXT":
            data = np.array([t.encode() for t in texts], dtype=object)
        elif spec.name == "LATENTS":
            data = np.random.default_rng(1).normal(size=(2, spec.shape[1], 4, 4)).astype(np.float32)
        else:
            data = model_inputs(2, seed=9)
        tensor = triton_grpc.InferInput(spec.name, list(data.shape), spec.datatype)
        tensor.set_data_from_numpy(data)
        result = grpc_client.infer(name, [tensor], headers=OPS)
        for output in meta.outputs:
            assert len(result.as_numpy(output.name)) == 2, (name, output.name)
        if name == "text.embed_text":
            expected = VTPReplica(TINYTEXT, device="cpu", warmup_size=0).embed_text(texts)
            np.testing.assert_allclose(result.as_numpy("CLIP_EMBEDDING"), expected, atol=1e-5)


def test_grpc_health_metadata_and_readiness(grpc_client: triton_grpc.InferenceServerClient) -> None:
    assert grpc_client.is_server_live(headers=OPS) and grpc_client.is_server_ready(headers=OPS)
    assert grpc_client.is_model_ready("tiny.encode", headers=OPS)
    assert grpc_client.is_model_ready("wide.decode", model_version="1", headers=OPS)
    starting = {"application": "starting"}
    assert grpc_client.is_server_live(headers=starting)
    assert not grpc_client.is_server_ready(headers=starting)
    assert not grpc_client.is_model_ready("vtp.encode", headers=starting)

    server = grpc_client.get_server_metadata(headers=OPS)
    assert server.name == "vtp-ray" and "binary_tensor_data" in server.extensions
    meta = grpc_client.get_model_metadata("wide.encode", headers=OPS)
    assert meta.name == "wide.encode" and list(meta.versions) == ["1"]
    assert {t.name: (t.datatype, list(t.shape)) for t in meta.inputs} == {
        "IMAGE": ("UINT8", [-1, -1, -1, 3]),
        "IMAGE_BYTES": ("BYTES", [-1]),
    }
    assert {t.name: list(t.shape) for t in meta.outputs} == {
        "LATENTS": [-1, WIDE_CHANNELS, -1, -1],
        "CLIP_EMBEDDING": [-1, 64],
    }
    index = grpc_client.get_model_repository_index(headers=OPS)
    assert {"tiny.encode", "tiny.decode", "wide.reconstruct", "wide.embed"} <= {m.name for m in index.models}
    assert all(m.state == "READY" for m in index.models)
    with pytest.raises(InferenceServerException) as raised:  # Triton's own RPCs are not this server's
        grpc_client.get_inference_statistics(headers=OPS)
    assert raised.value.status() == "StatusCode.UNIMPLEMENTED"


@pytest.mark.parametrize("model", ["tiny", "wide"])
def test_grpc_encode_equals_the_replica(
    grpc_client: triton_grpc.InferenceServerClient, replicas: dict[str, VTPReplica], model: str
) -> None:
    batch = model_inputs(3, seed=5)
    inp = triton_grpc.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    result = grpc_client.infer(f"{model}.encode", [inp], headers=OPS)
    expected = replicas[model].encode(batch)
    np.testing.assert_allclose(result.as_numpy("LATENTS"), expected.latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("CLIP_EMBEDDING"), expected.clip_embedding, rtol=1e-5, atol=1e-5)
    assert result.get_response().model_name == f"{model}.encode"


def test_grpc_bytes_reconstruct_decode_embed(
    grpc_client: triton_grpc.InferenceServerClient, replicas: dict[str, VTPReplica]
) -> None:
    files = [png_bytes(random_image(seed=30 + i)) for i in range(2)]
    pixels = np.stack([preprocess(f, size=SIZE) for f in files])
    inp = triton_grpc.InferInput("IMAGE_BYTES", [2], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object))
    recon = grpc_client.infer("tiny.reconstruct", [inp], headers=OPS).as_numpy("IMAGE")
    assert recon.dtype == np.uint8 and recon.shape == (2, SIZE, SIZE, 3)
    assert np.abs(recon.astype(int) - replicas["tiny"].reconstruct(pixels)).max() <= 1  # uint8 rounding

    # request parameters preprocess the files as ?size= and ?crop= do; only the requested output comes back
    bigger = grpc_client.infer(
        "wide.encode",
        [inp],
        outputs=[triton_grpc.InferRequestedOutput("LATENTS")],
        parameters={"size": 2 * SIZE, "crop": "resize"},
        headers=OPS,
    )
    expected = replicas["wide"].encode(np.stack([preprocess(f, size=2 * SIZE, crop="resize") for f in files]))
    np.testing.assert_allclose(bigger.as_numpy("LATENTS"), expected.latents, rtol=1e-5, atol=1e-5)
    assert bigger.as_numpy("CLIP_EMBEDDING") is None

    latents = replicas["wide"].encode(pixels).latents
    lat = triton_grpc.InferInput("LATENTS", list(latents.shape), "FP32")
    lat.set_data_from_numpy(latents)
    decoded = grpc_client.infer("wide.decode", [lat], headers=OPS).as_numpy("IMAGE")
    assert np.abs(decoded.astype(int) - replicas["wide"].decode(latents)).max() <= 1

    embedded = grpc_client.infer("wide.embed", [inp], headers=OPS).as_numpy("CLIP_EMBEDDING")
    np.testing.assert_allclose(embedded, replicas["wide"].embed(pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("app", "model", "pixels", "output", "code", "words"),
    [
        ("ops", "huge.encode", np.zeros((1, 16, 16, 3), np.uint8), None, "NOT_FOUND", "no model named 'huge'"),
        ("ops", "tiny.encode", np.zeros((1, 16, 16, 3), np.float32), None, "INVALID_ARGUMENT", "uint8"),
        ("ops", "tiny.encode", np.zeros((1, 20, 16, 3), np.uint8), None, "INVALID_ARGUMENT", "multiples of 16"),
        ("ops", "tiny.encode", np.zeros((1, 16, 16, 3), np.uint8), "NOPE", "INVALID_ARGUMENT", "unknown output"),
        ("starting", "vtp.embed", np.zeros((1, 16, 16, 3), np.uint8), None, "UNAVAILABLE", "cannot be placed"),
        ("keyed", "vtp.embed", np.zeros((1, 16, 16, 3), np.uint8), None, "UNAUTHENTICATED", "API key"),
        ("ops", "tiny.embed", np.zeros((1, 2400, 2400, 3), np.uint8), None, "INVALID_ARGUMENT", "max_body_bytes"),
    ],
    ids=["unknown-model", "wrong-datatype", "wrong-size", "unknown-output", "not-ready", "no-key", "over-body-limit"],
)
def test_grpc_errors_carry_the_app_message(
    grpc_client: triton_grpc.InferenceServerClient,
    app: str,
    model: str,
    pixels: np.ndarray,
    output: str | None,
    code: str,
    words: str,
) -> None:
    inp = triton_grpc.InferInput("IMAGE", list(pixels.shape), "UINT8" if pixels.dtype == np.uint8 else "FP32")
    inp.set_data_from_numpy(pixels)
    outputs = [triton_grpc.InferRequestedOutput(output)] if output else None
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.infer(model, [inp], outputs=outputs, headers={"application": app})
    assert raised.value.status() == f"StatusCode.{code}" and words in raised.value.message()


def test_grpc_api_key(grpc_client: triton_grpc.InferenceServerClient) -> None:
    keyed = {"application": "keyed"}
    assert grpc_client.is_server_live(headers=keyed)  # liveness never needs the key
    with pytest.raises(InferenceServerException, match="API key") as raised:
        grpc_client.get_server_metadata(headers=keyed)
    assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException, match="API key"):
        grpc_client.get_server_metadata(headers={**keyed, "authorization": "Bearer wrong"})
    assert grpc_client.get_server_metadata(headers={**keyed, "authorization": f"Bearer {KEY}"}).name == "vtp-ray"


def test_grpc_batch_sizes_in_trailing_metadata() -> None:
    """The protocol's generated stub, called directly: typed ``contents`` in, and each input's model call size in
    the trailing metadata ``x-vtp-batch-size`` (the REST header's twin)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    batch = model_inputs(3, seed=50)
    request = service_pb2.ModelInferRequest(model_name="tiny.embed")
    tensor = request.inputs.add(name="IMAGE", datatype="UINT8", shape=batch.shape)
    tensor.contents.uint_contents.extend(batch.ravel().tolist())
    with grpc.insecure_channel(TARGET) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=list(OPS.items()), timeout=120)
    assert [o.name for o in response.outputs] == ["CLIP_EMBEDDING"] and list(response.outputs[0].shape) == [3, 64]
    sizes = dict(call.trailing_metadata())["x-vtp-batch-size"].split(",")
    assert len(sizes) == 3 and max(int(s) for s in sizes) >= 2  # three queue entries, which shared model calls
