"""Serving as operators expect it: readiness, the Open Inference Protocol over REST and gRPC (checked with
tritonclient and with KServe's own clients), several checkpoints behind one API. Real Serve on the shared Ray, real
HTTP and gRPC (Serve's gRPC proxy) on loopback.

Four applications run side by side: ``ops`` at ``/`` serves two checkpoints of different widths (``tiny``, the
default, and ``wide``, built here with seeded random weights and saved with safetensors); ``broken`` at ``/broken``
names a checkpoint that does not exist; ``starting`` at ``/starting`` asks for a resource the cluster lacks, so its
replica never starts; ``keyed`` at ``/keyed`` is like ``starting`` with an API key. gRPC requests pick the
application with the ``application`` metadata, as Serve's gRPC proxy asks when it serves several.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from helpers import SIZE, TINY, TINYTEXT, UNLIMITED, model_inputs, png_bytes, random_image, wait_until
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
from safetensors.torch import save_file
from serving import ServeInstance, deploy
from tritonclient.utils import InferenceServerException

from deployments import AppSettings, compose_app
from vtp_ray import VTPReplica
from vtp_ray.images import preprocess
from vtp_ray.model import load_model

pytestmark = pytest.mark.slow

T = TypeVar("T")

WAIT_S = 2.0  # model_wait_s of the apps without a replica
KEY = "grpc-test-key"  # the keyed app's API key
WIDE_CHANNELS = 12
DECODE_BATCH = 6  # the ops app's max_decode_batch
DECODE_PIXELS = 100_000  # and max_decode_pixels


def make_wide_checkpoint(directory: Path) -> Path:
    """A second tiny checkpoint: wider trunk and decoder, 12 latent channels, seeded random weights."""
    config = json.loads((Path(TINY) / "config.json").read_text())
    config.update(vision_embed_dim=96, decoder_embed_dim=96, vision_feature_bottleneck=WIDE_CHANNELS)
    directory.mkdir(parents=True)
    (directory / "random.json").write_text(json.dumps(config))
    model = load_model(f"random:{directory / 'random.json'}").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wide_checkpoint(tmp_path_factory.mktemp("ckpt") / "vtp-wide")


# Replicas that stop at once when the module ends (Serve's default waits up to 20 s for in-flight requests).
QUICK_STOP = {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.5}


@pytest.fixture(scope="module")
def grpc_port(serve_instance: ServeInstance) -> int:
    return serve_instance.grpc_port


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance, wide_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    common = {"image_size": SIZE, "max_image_size": 256, "placement": "cpu", "rate_limits": UNLIMITED}
    missing = str(tmp_path_factory.mktemp("nothing") / "no-such-checkpoint")
    deploy(
        compose_app(AppSettings(model=missing, model_wait_s=WAIT_S, **common), **QUICK_STOP),
        "broken",
        "/broken",
        wait=False,
    )
    pending = compose_app(
        AppSettings(model=TINY, model_wait_s=WAIT_S, **common),
        ray_actor_options={"resources": {"NotOnThisCluster": 1}},
        **QUICK_STOP,
    )
    deploy(pending, "starting", "/starting", wait=False)
    keyed = compose_app(
        AppSettings(model=TINY, model_wait_s=WAIT_S, api_key=KEY, **common),
        ray_actor_options={"resources": {"NotOnThisCluster": 1}},
        **QUICK_STOP,
    )
    deploy(keyed, "keyed", "/keyed", wait=False)
    args = AppSettings(
        model=TINY,
        model_name="tiny",
        models={"wide": str(wide_dir), "text": TINYTEXT},
        max_batch_size=4,
        batch_wait_timeout_s=0.1,  # the entries of one request arrive together: they share calls within 0.1 s
        max_decode_batch=DECODE_BATCH,
        max_decode_pixels=DECODE_PIXELS,
        **common,
    )
    return deploy(compose_app(args, **QUICK_STOP), "ops", "/")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def triton_client(base_url: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=120, connection_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def replicas(wide_dir: Path) -> dict[str, VTPReplica]:
    return {
        "tiny": VTPReplica(TINY, device="cpu", warmup_size=0),
        "wide": VTPReplica(str(wide_dir), device="cpu", warmup_size=0),
        "text": VTPReplica(TINYTEXT, device="cpu", warmup_size=0),
    }


# ----------------------------------------------------------------------------------------------- readiness


def test_ready_app_reports_every_model(client: httpx.Client) -> None:
    body = wait_until(lambda: client.get("/readyz").json()["status"] == "ready" and client.get("/readyz"), 60, "ready")
    assert body.status_code == 200
    assert {name: m["ready"] for name, m in body.json()["models"].items()} == {"tiny": True, "wide": True, "text": True}
    assert client.get("/v2/health/ready").status_code == 200
    listed = client.get("/v1/models").json()
    assert listed["default"] == "tiny" and set(listed["models"]) == {"tiny", "wide", "text"}


def test_model_that_cannot_load(client: httpx.Client) -> None:
    assert client.get("/broken/healthz").status_code == 200  # alive...

    def failed() -> httpx.Response | None:
        response = client.get("/broken/readyz")
        return response if "failed to start" in response.json().get("error", "") else None

    response = wait_until(failed, 120, "the broken model to fail")  # ...never ready, with the loader's message
    assert response.status_code == 503 and "does not exist" in response.json()["error"]
    for method, path in [("GET", "/broken/v1/model"), ("POST", "/broken/v2/models/vtp.encode/infer")]:
        started = time.monotonic()
        answer = client.request(
            method,
            path,
            json={
                "inputs": [{"name": "IMAGE", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [0] * 64 * 64 * 3}]
            },
        )
        assert answer.status_code == 503, answer.text
        assert "does not exist" in answer.json()["error"]
        assert time.monotonic() - started < 60  # bounded (WAIT_S, plus the load on a shared machine), not a hang
    assert client.get("/broken/v2/health/ready").status_code == 503
    assert client.get("/broken/v2/models/vtp.encode/ready").status_code == 503


def test_a_replica_no_node_can_hold_is_reported_within_seconds(client: httpx.Client) -> None:
    """The ``starting`` app's replicas ask for a resource no node has: readiness says so (Ray's infeasible verdict),
    with what to change, instead of DEPLOYING in silence; requests get 503 with the same words after model_wait_s."""
    assert client.get("/starting/healthz").status_code == 200
    assert client.get("/starting/v2/health/live").status_code == 200

    def reported() -> httpx.Response | None:
        response = client.get("/starting/readyz")
        return response if "cannot be placed" in response.json().get("error", "") else None

    response = wait_until(reported, 20, "the unplaceable replica to be reported", interval_s=0.5)
    assert response.status_code == 503
    error = response.json()["error"]
    assert "NotOnThisCluster" in error and "ray_actor_options of deployment VTPReplica" in error, error
    listed = client.get("/starting/v1/models").json()["models"]["vtp"]
    assert listed["ready"] is False and listed["unplaceable"] in error
    started = time.monotonic()
    answer = client.post("/starting/v1/embed", content=png_bytes(random_image()), headers={"content-type": "image/png"})
    assert answer.status_code == 503 and "cannot be placed" in answer.json()["error"]
    assert answer.headers["retry-after"]
    assert WAIT_S - 0.5 <= time.monotonic() - started < 60  # waited for a replica, then gave up


# ------------------------------------------------------------------------------------------- several models


def test_models_by_query_header_and_default(client: httpx.Client) -> None:
    assert client.get("/v1/model").json()["latent_channels"] == 8
    by_query = client.get("/v1/model", params={"model": "wide"}).json()
    assert by_query["latent_channels"] == WIDE_CHANNELS and by_query["name"] == "wide"
    assert by_query["models"] == ["tiny", "wide", "text"]
    assert client.get("/v1/model", headers={"x-vtp-model": "wide"}).json()["latent_channels"] == WIDE_CHANNELS
    unknown = client.get("/v1/model", params={"model": "huge"})
    assert unknown.status_code == 404 and "huge" in unknown.json()["error"]


def test_http_api_runs_the_named_model(client: httpx.Client, replicas: dict[str, VTPReplica]) -> None:
    image = model_inputs(1, seed=7)
    response = client.post("/v1/embed?model=wide", content=png_bytes(image[0]), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    expected = replicas["wide"].embed(image)[0]
    np.testing.assert_allclose(response.json()["embedding"], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- Open Inference Protocol


def test_triton_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("tiny.encode") and triton_client.is_model_ready("wide.decode")
    assert not triton_client.is_model_ready("huge.encode")
    meta = triton_client.get_model_metadata("wide.encode")
    assert meta["name"] == "wide.encode" and meta["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "IMAGE": ("UINT8", [-1, -1, -1, 3]),
        "IMAGE_BYTES": ("BYTES", [-1]),
    }
    assert {t["name"]: t["shape"] for t in meta["outputs"]} == {
        "LATENTS": [-1, WIDE_CHANNELS, -1, -1],
        "CLIP_EMBEDDING": [-1, 64],
    }
    assert triton_client.get_model_metadata("tiny.decode", model_version="1")["inputs"][0]["shape"] == [-1, 8, -1, -1]
    names = {m["name"] for m in triton_client.get_model_repository_index()}
    assert {"tiny.encode", "tiny.decode", "wide.reconstruct", "wide.embed"} <= names


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["tiny", "wide"])
def test_triton_encode_equals_the_replica(
    triton_client: triton.InferenceServerClient, replicas: dict[str, VTPReplica], model: str, binary: bool
) -> None:
    batch = model_inputs(3)
    inp = triton.InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("LATENTS", "CLIP_EMBEDDING")]
    result = triton_client.infer(f"{model}.encode", [inp], outputs=outputs)
    expected = replicas[model].encode(batch)
    np.testing.assert_allclose(result.as_numpy("LATENTS"), expected.latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("CLIP_EMBEDDING"), expected.clip_embedding, rtol=1e-5, atol=1e-5)


def test_triton_bytes_reconstruct_decode_embed(
    triton_client: triton.InferenceServerClient, replicas: dict[str, VTPReplica]
) -> None:
    files = [png_bytes(random_image(seed=i)) for i in range(2)]
    pixels = np.stack([preprocess(f, size=SIZE) for f in files])
    inp = triton.InferInput("IMAGE_BYTES", [2], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    recon = triton_client.infer("tiny.reconstruct", [inp]).as_numpy("IMAGE")
    assert recon.dtype == np.uint8 and recon.shape == (2, SIZE, SIZE, 3)
    assert np.abs(recon.astype(int) - replicas["tiny"].reconstruct(pixels)).max() <= 1  # uint8 rounding

    latents = replicas["wide"].encode(pixels).latents
    lat = triton.InferInput("LATENTS", list(latents.shape), "FP32")
    lat.set_data_from_numpy(latents)
    decoded = triton_client.infer("wide.decode", [lat]).as_numpy("IMAGE")
    assert np.abs(decoded.astype(int) - replicas["wide"].decode(latents)).max() <= 1

    embedded = triton_client.infer("wide.embed", [inp]).as_numpy("CLIP_EMBEDDING")
    np.testing.assert_allclose(embedded, replicas["wide"].embed(pixels), rtol=1e-5, atol=1e-5)


def test_infer_images_are_batch_entries(client: httpx.Client) -> None:
    batch = model_inputs(3)
    body = {
        "inputs": [{"name": "IMAGE", "shape": list(batch.shape), "datatype": "UINT8", "data": batch.ravel().tolist()}]
    }
    response = client.post("/v2/models/tiny.embed/infer", content=json.dumps(body))  # no Content-Type, as tritonclient
    assert response.status_code == 200, response.text
    sizes = [int(s) for s in response.headers["x-vtp-batch-size"].split(",")]
    assert len(sizes) == 3 and max(sizes) >= 2  # three queue entries, which shared model calls
    assert response.json()["outputs"][0]["shape"] == [3, 64]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/tiny.encode/infer", b"{not json", 400, "invalid infer request JSON"),
        (
            "/v2/models/tiny.encode/infer",
            {"inputs": [{"name": "IMAGE", "shape": [1, 64, 64, 3], "datatype": "FP32", "data": [0.0] * 12288}]},
            400,
            "uint8",
        ),
        (
            "/v2/models/tiny.encode/infer",
            {"inputs": [{"name": "IMAGE", "shape": [1, 60, 64, 3], "datatype": "UINT8", "data": [0] * 11520}]},
            400,
            "multiples of 16",
        ),
        (
            "/v2/models/tiny.encode/infer",
            {"inputs": [{"name": "IMAGE", "shape": [2, 64, 64, 3], "datatype": "UINT8", "data": [0] * 5}]},
            400,
            "do not fill",
        ),
        (
            "/v2/models/tiny.decode/infer",
            {"inputs": [{"name": "LATENTS", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}]},
            400,
            "latents must have shape",
        ),
        (
            "/v2/models/tiny.encode/infer",
            {"inputs": [{"name": "PIXELS", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
            400,
            "exactly one input",
        ),
        (
            "/v2/models/tiny.embed/infer",
            {"inputs": [{"name": "IMAGE_BYTES", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]},
            400,
            "image",
        ),
        ("/v2/models/huge.encode/infer", {"inputs": []}, 404, "huge"),
        ("/v2/models/tiny.fly/infer", {"inputs": []}, 404, "<model>.<verb>"),
        ("/v2/models/tiny.encode/versions/2/infer", {"inputs": []}, 404, "version"),
    ],
)
def test_infer_errors(client: httpx.Client, path: str, body: object, status: int, words: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=content)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


# ------------------------------------------------------------------------- KServe's Python client (REST, v2)


def with_kserve(work: Callable[[InferenceRESTClient], Awaitable[T]]) -> T:
    """Run ``work`` with a fresh ``kserve.InferenceRESTClient`` (protocol v2) in an event loop of its own: the
    client is asynchronous, and its httpx pool must not outlive the loop it was made in."""

    async def run() -> T:
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0)) as kserve_client:
            return await work(kserve_client)

    return asyncio.run(run())


def kserve_infer(base_url: str, model: str, inputs: list[InferInput], **request: object) -> tuple[InferResponse, dict]:
    """One infer request through KServe's client -> its parsed response and the response headers."""
    headers: dict[str, str] = {}
    req = InferRequest(model, inputs, **request)
    response = with_kserve(lambda c: c.infer(base_url, req, model_name=model, response_headers=headers))
    return response, headers


def kserve_output(response: InferResponse, name: str) -> np.ndarray:
    """The output ``name`` of a KServe response as a numpy array (JSON data or binary data alike)."""
    output = response.get_output_by_name(name)
    assert output is not None, [o.name for o in response.outputs]
    return output.as_numpy()


def test_kserve_health_and_readiness(base_url: str) -> None:
    async def check(c: InferenceRESTClient) -> list[bool]:
        return [
            await c.is_server_live(base_url),
            await c.is_server_ready(base_url),
            await c.is_model_ready(base_url, "tiny.encode"),
            await c.is_model_ready(base_url, "wide.decode"),
            await c.is_model_ready(base_url, "huge.encode"),  # 404: no such model
            await c.is_model_ready(base_url, "tiny.fly"),  # 404: no such verb
            await c.is_server_live(f"{base_url}/starting"),
            await c.is_model_ready(f"{base_url}/starting", "vtp.encode"),  # 503: no replica yet
        ]

    assert with_kserve(check) == [True, True, True, True, False, False, True, False]
    # A server that is not ready: the client raises, with the app's reason in the message.
    with pytest.raises(httpx.HTTPStatusError, match="cannot be placed") as raised:
        with_kserve(lambda c: c.is_server_ready(f"{base_url}/starting"))
    assert raised.value.response.status_code == 503


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["tiny", "wide"])
def test_kserve_encode_equals_the_replica(
    base_url: str, replicas: dict[str, VTPReplica], model: str, binary: bool
) -> None:
    batch = model_inputs(3, seed=3)
    inp = InferInput("IMAGE", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch, binary_data=binary)
    response, headers = kserve_infer(base_url, f"{model}.encode", [inp], parameters={"binary_data_output": binary})
    assert ("inference-header-content-length" in headers) == binary  # the outputs came back as asked
    assert response.model_name == f"{model}.encode"
    expected = replicas[model].encode(batch)
    np.testing.assert_allclose(kserve_output(response, "LATENTS"), expected.latents, rtol=1e-5, atol=1e-6)
    clip = kserve_output(response, "CLIP_EMBEDDING")
    np.testing.assert_allclose(clip, expected.clip_embedding, rtol=1e-5, atol=1e-6)


def test_kserve_bytes_embed_and_json_decode(base_url: str, replicas: dict[str, VTPReplica]) -> None:
    files = [png_bytes(random_image(seed=20 + i)) for i in range(2)]
    pixels = np.stack([preprocess(f, size=SIZE) for f in files])
    inp = InferInput("IMAGE_BYTES", [2], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object))  # BYTES elements as binary tensor data
    response, _ = kserve_infer(base_url, "wide.embed", [inp])
    embedded = kserve_output(response, "CLIP_EMBEDDING")
    np.testing.assert_allclose(embedded, replicas["wide"].embed(pixels), rtol=1e-5, atol=1e-6)

    latents = replicas["tiny"].encode(pixels).latents
    lat = InferInput("LATENTS", list(latents.shape), "FP32", data=latents)  # an array as data: JSON numbers
    response, headers = kserve_infer(base_url, "tiny.decode", [lat])
    assert "inference-header-content-length" not in headers
    decoded = kserve_output(response, "IMAGE")
    assert decoded.dtype == np.uint8 and decoded.shape == (2, SIZE, SIZE, 3)
    assert np.abs(decoded.astype(int) - replicas["tiny"].decode(latents)).max() <= 1  # uint8 rounding


@pytest.mark.parametrize(
    ("prefix", "model", "pixels", "status", "words"),
    [
        ("", "huge.encode", np.zeros((1, 16, 16, 3), np.uint8), 404, "no model named 'huge'"),
        ("", "tiny.encode", np.zeros((1, 16, 16, 3), np.float32), 400, "uint8"),
        ("", "tiny.encode", np.zeros((1, 20, 16, 3), np.uint8), 400, "multiples of 16"),
        ("/starting", "vtp.embed", np.zeros((1, 16, 16, 3), np.uint8), 503, "cannot be placed"),
    ],
    ids=["unknown-model", "wrong-datatype", "wrong-size", "not-ready"],
)
def test_kserve_errors_carry_the_app_message(
    base_url: str, prefix: str, model: str, pixels: np.ndarray, status: int, words: str
) -> None:
    inp = InferInput("IMAGE", list(pixels.shape), "UINT8" if pixels.dtype == np.uint8 else "FP32")
    inp.set_data_from_numpy(pixels)
    with pytest.raises(httpx.HTTPStatusError) as raised:
        kserve_infer(f"{base_url}{prefix}", model, [inp])
    error = raised.value.response.json()["error"]
    assert raised.value.response.status_code == status and words in error
    assert error in str(raised.value)  # the client's exception carries the app's message


# ------------------------------------------------------------------------------------ every listed OIP model


def oip_inputs(meta: dict, client_module: object) -> list:
    """One request's inputs for an OIP model, from its metadata: two images, two latents or two texts."""
    spec = meta["inputs"][0]
    name, datatype = spec["name"], spec["datatype"]
    if name == "TEXT":
        data = np.array([b"a photo of a cat", "ein Foto eines Hundes \u2014 \U0001f415".encode()], dtype=object)
    elif name == "LATENTS":
        data = np.random.default_rng(0).normal(size=(2, spec["shape"][1], 4, 4)).astype(np.float32)
    else:
        data = model_inputs(2, seed=7)
    tensor = client_module.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return [tensor]


def test_every_listed_model_answers_metadata_and_infer(
    triton_client: triton.InferenceServerClient, replicas: dict[str, VTPReplica]
) -> None:
    """What the repository index lists is what the server serves: metadata and an infer of each, with tritonclient;
    a checkpoint without CLIP's text vocabulary lists no embed_text."""
    listed = [m["name"] for m in triton_client.get_model_repository_index()]
    assert {"tiny.encode", "tiny.decode", "tiny.embed", "text.embed_text"} <= set(listed)
    assert "tiny.embed_text" not in listed and "wide.embed_text" not in listed
    for name in listed:
        meta = triton_client.get_model_metadata(name)
        result = triton_client.infer(name, oip_inputs(meta, triton))
        for output in meta["outputs"]:
            array = result.as_numpy(output["name"])
            assert array is not None and len(array) == 2, (name, output)
            assert all(d in (-1, n) for d, n in zip(output["shape"], array.shape, strict=True)), (name, output)
    texts = ["a photo of a cat", "ein Foto eines Hundes \u2014 \U0001f415"]
    result = triton_client.infer(
        "text.embed_text", oip_inputs(triton_client.get_model_metadata("text.embed_text"), triton)
    )
    np.testing.assert_allclose(result.as_numpy("CLIP_EMBEDDING"), replicas["text"].embed_text(texts), atol=1e-5)
    with pytest.raises(InferenceServerException, match="text tower does not use CLIP"):
        triton_client.get_model_metadata("tiny.embed_text")


# --------------------------------------------------------- gRPC (inference.GRPCInferenceService), two clients


def test_tritonclient_grpc(base_url: str, grpc_port: int, wide_dir: Path) -> None:
    """tritonclient.grpc's checks (``grpc_triton_checks.py``) run in a pytest of their own: tritonclient.grpc and
    kserve both register the protocol's ``inference.*`` messages in protobuf's default pool, so no process can
    import both, and this one has kserve."""
    env = {**os.environ, "VTP_TEST_GRPC_TARGET": f"127.0.0.1:{grpc_port}", "VTP_TEST_WIDE_CHECKPOINT": str(wide_dir)}
    checks = Path(__file__).with_name("grpc_triton_checks.py")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=checks.parent.parent)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_kserve_grpc_client_typed_contents(grpc_port: int, base_url: str, replicas: dict[str, VTPReplica]) -> None:
    """KServe's own gRPC client; its inputs given as lists travel as typed ``contents``, not raw bytes."""
    metadata = [("application", "ops")]
    pixels = model_inputs(2, seed=40)
    latents = replicas["tiny"].encode(pixels).latents

    async def run() -> tuple[list[bool], InferResponse, InferResponse]:
        client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=120, retries=0)
        try:
            health = [
                await client.is_server_live(headers=metadata),
                await client.is_server_ready(headers=metadata),
                await client.is_model_ready("tiny.decode", headers=metadata),
            ]
            lat = InferInput("LATENTS", list(latents.shape), "FP32", data=latents.ravel().tolist())
            decoded = await client.infer(InferRequest("tiny.decode", [lat]), headers=metadata)
            img = InferInput("IMAGE", list(pixels.shape), "UINT8", data=pixels.ravel().tolist())
            embedded = await client.infer(InferRequest("tiny.embed", [img]), headers=metadata)
            return health, decoded, embedded
        finally:
            await client.close()

    health, decoded, embedded = asyncio.run(run())
    assert health == [True, True, True]
    image = kserve_output(decoded, "IMAGE")
    assert image.dtype == np.uint8 and image.shape == (2, SIZE, SIZE, 3)
    assert np.abs(image.astype(int) - replicas["tiny"].decode(latents)).max() <= 1
    np.testing.assert_allclose(kserve_output(embedded, "CLIP_EMBEDDING"), replicas["tiny"].embed(pixels), atol=1e-5)


# ------------------------------------------------------------- one limit, every route (/v1, OIP REST, OIP gRPC)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((DECODE_BATCH + 1, 8, 4, 4), f"7 latents in one request, over the limit of {DECODE_BATCH} (max_decode_batch)"),
        ((2, 8, 16, 16), f"2 latents decode to 131072 pixels, over the limit of {DECODE_PIXELS} (max_decode_pixels)"),
    ],
    ids=["batch", "pixels"],
)
def test_decode_limits_refuse_alike_on_every_route(
    client: httpx.Client, grpc_port: int, shape: tuple[int, ...], words: str
) -> None:
    """The same over-limit latents get the same refusal from /v1/decode, the OIP over REST and over gRPC."""
    latents = np.zeros(shape, np.float32)
    buffer = io.BytesIO()
    np.save(buffer, latents)
    v1 = client.post("/v1/decode", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    body = {"inputs": [{"name": "LATENTS", "shape": list(shape), "datatype": "FP32", "data": latents.ravel().tolist()}]}
    rest = client.post("/v2/models/tiny.decode/infer", content=json.dumps(body))

    async def grpc_infer() -> None:
        grpc_client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}", timeout=60, retries=0)
        try:
            lat = InferInput("LATENTS", list(shape), "FP32")
            lat.set_data_from_numpy(latents)
            await grpc_client.infer(InferRequest("tiny.decode", [lat]), headers=[("application", "ops")])
        finally:
            await grpc_client.close()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(grpc_infer())
    assert (v1.status_code, rest.status_code) == (413, 413), (v1.text, rest.text)
    assert v1.json()["error"] == rest.json()["error"] == refused.value.details()
    assert words in v1.json()["error"]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
