"""The Serve application end to end: the shared local Ray, real HTTP on a free loopback port, the tiny model.

Two applications run side by side: ``vtp`` at ``/`` (one CPU replica, no API key) for the API's behaviour, and
``vtp-npu`` at ``/npu`` (two replicas pinned to declared NPUs the standard way, ``ray_actor_options``, with an
API key) for placement and authentication.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import (
    CHANNELS,
    NPY,
    ROOT,
    SIZE,
    TINY,
    UNLIMITED,
    model_inputs,
    png_array,
    png_bytes,
    post_concurrently,
    random_image,
    replicas_seen,
)
from serving import ServeInstance, deploy, wait_running

from deployments import AppSettings, build_app, compose_app
from deployments.model.selection import fits_by_value
from vtp_ray import VTPReplica
from vtp_ray.cpu_threads import fewest_threads
from vtp_ray.images import preprocess
from vtp_ray.placement import OPENMP_WAIT_VARS, OPENMP_WAITS, PlacementError

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 300_000
MAX_PIXELS = 1_000_000
MAX_IMAGE_SIZE = 256
MAX_DECODE_BATCH = 6
KEY = "test-key-0123"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance) -> str:
    args = AppSettings(
        model=TINY,
        image_size=SIZE,
        max_image_size=MAX_IMAGE_SIZE,
        max_batch_size=4,
        batch_wait_timeout_s=0.1,
        max_body_bytes=MAX_BODY_BYTES,
        max_pixels=MAX_PIXELS,
        placement={"num_cpus": 2},  # two torch threads to start from: cpu_threads="auto" picks one or both
        max_decode_batch=MAX_DECODE_BATCH,
        max_decode_pixels=MAX_DECODE_BATCH * SIZE * SIZE,
        rate_limits=UNLIMITED,
    )
    url = deploy(compose_app(args), "vtp", "/", wait=False)
    npu = AppSettings(model=TINY, image_size=SIZE, api_key=KEY, device="cpu", rate_limits=UNLIMITED)  # declared NPUs
    pinned = compose_app(npu, num_replicas=2, ray_actor_options={"num_cpus": 0.5, "resources": {"NPU": 1}})
    deploy(pinned, "vtp-npu", "/npu", wait=False)
    wait_running("vtp", "vtp-npu")
    return url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    return VTPReplica(TINY, device="cpu", warmup_size=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return random_image()


@pytest.fixture(scope="module")
def png(image: np.ndarray) -> bytes:
    return png_bytes(image)


def post_image(client: httpx.Client, path: str, data: bytes, **kwargs: Any) -> httpx.Response:
    return client.post(path, content=data, headers={"content-type": "image/png", **kwargs.pop("headers", {})}, **kwargs)


def latents_of(response: httpx.Response) -> np.ndarray:
    body = response.json()
    return np.frombuffer(base64.b64decode(body["latents"]), dtype="<f4").reshape(body["shape"])


# -------------------------------------------------------------------------------------- args and placement


def test_only_small_calls_go_by_value() -> None:
    image = np.zeros((256, 256, 3), np.uint8)  # 196 KB: past Ray's inline limit, well within gRPC's
    assert fits_by_value("run", ("reconstruct", image)) and fits_by_value("classify", (image, ("cat",), "default"))
    assert fits_by_value("run", ("embed_text", ("a photo",))) and fits_by_value("info", ())
    assert not fits_by_value("run", ("encode", np.zeros((1024, 1024, 3), np.uint8)))  # 3 MiB: the object store
    assert not fits_by_value("run", ("decode", np.zeros((64, 16, 16), np.float32)))  # the image is larger
    assert not fits_by_value("run_many", ("encode", image[None]))  # N answers


def test_explicit_npu_placement_fails_fast_naming_the_setting(base_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(PlacementError, match=r"applications\[\]\.args\.placement"):
        build_app({"model": TINY, "placement": {"resources": {"GPU": 1}}})
    assert time.monotonic() - started < 5


def test_health_and_model_info(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["model"] == "vtp-tiny" and info["model_spec"] == TINY
    assert info["random_weights"] is False and len(info["config_digest"]) > 0
    assert (info["device"], info["precision"]) == ("cpu", "fp32")  # CPUs only: no accelerator assigned
    assert info["cuda_graphs"]["enabled"] is False and info["cuda_graphs"]["reason"] == "not on CUDA (cpu)"
    # A CPU replica's OpenMP threads spin only briefly at barriers (they share the cores with the ingress), unless
    # the environment says how they wait.
    ours = {var: os.environ[var] for var in OPENMP_WAIT_VARS if var in os.environ}
    assert info["replica"]["openmp_waits"] == (ours or OPENMP_WAITS)
    # cpu_threads auto: of the 2 threads its placement gives, the fewest within the margin of the fastest warm-up call
    timings = {int(n): ms for n, ms in info["replica"]["cpu_thread_timings_ms"].items()}
    assert set(timings) == {2, 1} and info["replica"]["cpu_threads"] == fewest_threads(timings)
    assert (info["latent_channels"], info["embedding_dim"]) == (CHANNELS, 64)
    assert info["batching"] == {
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.1,
        "batch_min_share": 0.05,
        "batch_work_size": None,
        "batch_work_max_ms": 250.0,
        "batch_idle_work_size": None,
    }
    assert info["limits"]["image_size"] == SIZE and info["limits"]["api_key_required"] is False


# ---------------------------------------------------------------------------------------------- round trips


def test_encode_equals_replica_encode(client: httpx.Client, png: bytes, replica: VTPReplica) -> None:
    expected = replica.encode(preprocess(png, size=SIZE)[None])[0]
    response = post_image(client, "/v1/encode", png)
    assert response.status_code == 200, response.text
    assert response.headers["x-vtp-batch-size"] == "1"
    body = response.json()
    assert body["shape"] == [CHANNELS, SIZE // 16, SIZE // 16] and body["dtype"] == "float32"
    np.testing.assert_allclose(latents_of(response), expected.latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(body["clip_embedding"], expected.clip_embedding, rtol=1e-5, atol=1e-5)

    as_npy = post_image(client, "/v1/encode", png, headers={"accept": NPY})
    assert as_npy.status_code == 200 and as_npy.headers["content-type"] == NPY
    assert as_npy.headers["x-vtp-batch-size"] == "1"
    np.testing.assert_array_equal(np.load(io.BytesIO(as_npy.content)), latents_of(response))


def test_encode_then_decode_equals_reconstruct(client: httpx.Client, png: bytes) -> None:
    reconstruction = post_image(client, "/v1/reconstruct", png)
    assert reconstruction.status_code == 200 and reconstruction.headers["content-type"] == "image/png"
    assert reconstruction.headers["x-vtp-batch-size"] == "1"
    stages = [entry.split(";dur=")[0].strip() for entry in reconstruction.headers["server-timing"].split(",")]
    assert stages == ["read", "preprocess", "hop", "queue", "model", "output"]
    expected = png_array(reconstruction.content)
    assert expected.shape == (SIZE, SIZE, 3)

    encoded = post_image(client, "/v1/encode", png)
    from_json = client.post("/v1/decode", json=encoded.json())  # clip_embedding rides along, ignored
    assert from_json.status_code == 200, from_json.text
    assert from_json.headers["x-vtp-batch-size"] == "1"
    npy = post_image(client, "/v1/encode", png, headers={"accept": NPY}).content
    from_npy = client.post("/v1/decode", content=npy, headers={"content-type": NPY})
    assert from_npy.status_code == 200, from_npy.text
    for decoded in (from_json, from_npy):
        assert np.abs(png_array(decoded.content).astype(int) - expected).max() <= 1


def test_embed_equals_encode_embedding(client: httpx.Client, png: bytes) -> None:
    embedded = post_image(client, "/v1/embed", png)
    assert embedded.status_code == 200 and embedded.headers["x-vtp-batch-size"] == "1"
    body = embedded.json()
    assert body["dim"] == 64 and len(body["embedding"]) == 64
    np.testing.assert_allclose(body["embedding"], post_image(client, "/v1/encode", png).json()["clip_embedding"])


def test_multipart_upload_equals_raw_body(client: httpx.Client, png: bytes) -> None:
    raw = post_image(client, "/v1/reconstruct", png)
    multipart = client.post("/v1/reconstruct", files={"image": ("photo.png", png, "image/png")})
    assert multipart.status_code == 200, multipart.text
    assert multipart.content == raw.content


def test_size_and_crop_options(client: httpx.Client, png: bytes, replica: VTPReplica) -> None:
    for crop in ("center", "resize"):
        response = post_image(client, "/v1/reconstruct", png, params={"size": 32, "crop": crop})
        assert response.status_code == 200, response.text
        expected = replica.reconstruct(preprocess(png, size=32, crop=crop)[None])[0]
        assert np.abs(png_array(response.content).astype(int) - expected).max() <= 1


# ----------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_form_batches(base_url: str, replica: VTPReplica) -> None:
    images = [random_image(seed=i) for i in range(8)]
    requests = [
        {"url": "/v1/encode", "content": png_bytes(im), "headers": {"content-type": "image/png"}} for im in images
    ]
    responses = post_concurrently(base_url, requests)
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-vtp-batch-size"]) for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 4, sizes
    expected = replica.encode(np.stack([preprocess(png_bytes(im), size=SIZE) for im in images])).latents
    for response, latents in zip(responses, expected, strict=True):
        np.testing.assert_allclose(latents_of(response), latents, rtol=1e-4, atol=1e-4)


def test_requests_of_different_sizes_never_share_a_model_call(base_url: str, png: bytes) -> None:
    sizes = [64, 32, 64, 32, 64, 32, 64, 32]
    requests = [
        {"url": "/v1/encode", "params": {"size": s}, "content": png, "headers": {"content-type": "image/png"}}
        for s in sizes
    ]
    responses = post_concurrently(base_url, requests)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for size, response in zip(sizes, responses, strict=True):
        assert response.json()["shape"] == [CHANNELS, size // 16, size // 16]
    # A model call holds one shape only: at most the 4 requests of the same size from one formed batch.
    assert max(int(r.headers["x-vtp-batch-size"]) for r in responses) <= 4


# -------------------------------------------------------------------------------------------- bad input


def _png_of_size(width: int, height: int) -> bytes:
    return png_bytes(np.zeros((height, width, 3), np.uint8))


def _latents_json(array: np.ndarray, **overrides: Any) -> dict[str, Any]:
    body = {
        "shape": list(array.shape),
        "dtype": "float32",
        "latents": base64.b64encode(array.astype("<f4").tobytes()).decode(),
    }
    return {**body, **overrides}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


_GOOD_LATENTS = np.zeros((CHANNELS, 4, 4), np.float32)
_NAN_LATENTS = _GOOD_LATENTS.copy()
_NAN_LATENTS[0, 0, 0] = np.nan
_IMAGE = {"content-type": "image/png"}
_JSON = {"content-type": "application/json"}
_NPY = {"content-type": NPY}
_BAD_INPUTS = {
    # name: (path, request kwargs, status, words the error must contain)
    "empty image": ("/v1/reconstruct", {"content": b"", "headers": _IMAGE}, 400, "empty"),
    "not an image": ("/v1/encode", {"content": b"hello, world", "headers": _IMAGE}, 400, "not an image"),
    "truncated image": (
        "/v1/embed",
        {"content": png_bytes(random_image())[:3000], "headers": _IMAGE},
        400,
        "truncated",
    ),
    "too many pixels": ("/v1/encode", {"content": _png_of_size(1100, 1000), "headers": _IMAGE}, 413, "pixels"),
    "body over the limit": ("/v1/encode", {"content": bytes(MAX_BODY_BYTES + 1), "headers": _IMAGE}, 413, "limit"),
    "wrong content type": ("/v1/reconstruct", {"content": b"{}", "headers": _JSON}, 415, "Content-Type"),
    "no content type": ("/v1/embed", {"content": b"abc"}, 415, "Content-Type"),
    "multipart without image": ("/v1/embed", {"files": {"photo": ("a.png", b"x")}}, 400, "'image'"),
    "multipart over the limit": ("/v1/embed", {"files": {"image": ("a.png", bytes(MAX_BODY_BYTES))}}, 413, "limit"),
    "size not a multiple of 16": (
        "/v1/encode",
        {"params": {"size": 40}, "content": b"x", "headers": _IMAGE},
        400,
        "size",
    ),
    "size over the maximum": ("/v1/encode", {"params": {"size": 512}, "content": b"x", "headers": _IMAGE}, 400, "size"),
    "unknown crop": ("/v1/encode", {"params": {"crop": "diagonal"}, "content": b"x", "headers": _IMAGE}, 422, "crop"),
    "latents not json": ("/v1/decode", {"content": b"{nope", "headers": _JSON}, 422, "JSON"),
    "latents field missing": ("/v1/decode", {"json": {"shape": [8, 4, 4], "dtype": "float32"}}, 422, "latents"),
    "latents shape rank": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS[0], shape=[4, 4])}, 400, "shape"),
    "latents batch": ("/v1/decode", {"json": _latents_json(np.zeros((7, CHANNELS, 4, 4), np.float32))}, 413, "batch"),
    "latents pixels": ("/v1/decode", {"json": _latents_json(np.zeros((2, CHANNELS, 16, 16), np.float32))}, 413, "pix"),
    "latents dtype": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, dtype="float16")}, 400, "dtype"),
    "latents not base64": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, latents="@@@")}, 400, "base64"),
    "latents bytes vs shape": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, shape=[8, 4, 5])}, 400, "bytes"),
    "latents channels": ("/v1/decode", {"json": _latents_json(np.zeros((4, 4, 4), np.float32))}, 400, "shape"),
    "latents NaN": ("/v1/decode", {"json": _latents_json(_NAN_LATENTS)}, 400, "NaN"),
    "npy not a file": ("/v1/decode", {"content": b"\x93NUMPY garbage", "headers": _NPY}, 400, ".npy"),
    "npy pickled": ("/v1/decode", {"content": _npy(np.array([{}], dtype=object)), "headers": _NPY}, 400, ".npy"),
    "npy integers": ("/v1/decode", {"content": _npy(np.zeros((8, 4, 4), np.int32)), "headers": _NPY}, 400, "float"),
    "npy inf": ("/v1/decode", {"content": _npy(np.full((8, 4, 4), np.inf, np.float32)), "headers": _NPY}, 400, "inf"),
    "npy too large": (
        "/v1/decode",
        {"content": _npy(np.zeros((8, 32, 32), np.float32)), "headers": _NPY},
        413,
        "limit",
    ),
    "latents wrong type": ("/v1/decode", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "npy"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_input_gets_4xx_and_the_server_keeps_serving(client: httpx.Client, png: bytes, case: str) -> None:
    path, kwargs, status, words = _BAD_INPUTS[case]
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.get("/healthz").status_code == 200
    assert post_image(client, "/v1/embed", png).status_code == 200


def test_body_over_the_limit_is_refused_while_streaming(client: httpx.Client, png: bytes) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(8):
            yield bytes(MAX_BODY_BYTES // 4)

    response = client.post("/v1/encode", content=chunks(), headers=_IMAGE)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert post_image(client, "/v1/embed", png).status_code == 200


def test_unknown_route_and_method_errors_are_json(client: httpx.Client) -> None:
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    response = client.get("/v1/encode")
    assert response.status_code == 405 and "error" in response.json()


def test_malformed_json_errors_carry_pydantics_detail(client: httpx.Client) -> None:
    response = client.post("/v1/decode", content=b"{nope", headers=_JSON)
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
    pickled = client.post("/v1/decode", content=_npy(np.array([{}], dtype=object)), headers=_NPY)
    assert "pickle" not in pickled.json()["error"]  # nothing that reads like advice to load it unsafely


@pytest.mark.parametrize("dtype", ["<f2", "<f8", ">f4"])
def test_npy_latents_of_other_float_dtypes_are_converted(client: httpx.Client, png: bytes, dtype: str) -> None:
    latents = np.load(io.BytesIO(post_image(client, "/v1/encode", png, headers={"accept": NPY}).content))
    reference = client.post("/v1/decode", content=_npy(latents), headers=_NPY)
    converted = client.post("/v1/decode", content=_npy(latents.astype(dtype)), headers=_NPY)
    assert converted.status_code == 200, converted.text
    tolerance = 8 if dtype == "<f2" else 1  # float16 rounding of the latents moves a few pixels
    assert np.abs(png_array(converted.content).astype(int) - png_array(reference.content)).max() <= tolerance


def test_the_ingress_never_imports_torch() -> None:
    code = "import sys, deployments, deployments.ingress, deployments.model.protocol; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


def test_a_job_on_an_app_imports_only_the_protocol_not_the_app() -> None:
    # Each process of a job's model stage on an app (and its driver) imports deployments.model.protocol: with the app
    # (FastAPI, the ingress, Serve's app building) behind it, 1.3 s each; a `vtp-ray tokenize --serve-app` of 400
    # images on a warm app took 6.2 s, then 5.4 s (docs/results.md, SF29).
    code = (
        "import sys, deployments.model.protocol; print(sorted(m for m in ('deployments.app', 'deployments.ingress', "
        "'fastapi', 'ray.serve') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
    loaded = "from deployments import AppArgs, AppSettings, compose_app; print(AppArgs is AppSettings)"
    assert (
        subprocess.run(
            [sys.executable, "-c", loaded], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        == "True"
    )


# ----------------------------------------------------------------------- placement and the API key (/npu)


@pytest.fixture(scope="module")
def npu_client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base_url}/npu", timeout=60, headers=AUTH) as c:
        yield c


def test_each_replica_sees_its_own_npu_and_uses_its_cpu(npu_client: httpx.Client) -> None:
    replicas = replicas_seen(npu_client, 2)
    assert sorted(r["visible_devices"]["ASCEND_RT_VISIBLE_DEVICES"] for r in replicas.values()) == ["0", "1"]
    assert sorted(r["accelerator_ids"]["NPU"][0] for r in replicas.values()) == ["0", "1"]


def test_api_key_guards_v1_but_not_healthz(npu_client: httpx.Client, png: bytes) -> None:
    image = {"content": png, "headers": {"content-type": "image/png"}}
    with httpx.Client(base_url=npu_client.base_url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            response = anonymous.get("/v1/model", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
        # Refused before the body is looked at: a bad body still gets 401, not 400.
        response = anonymous.post("/v1/embed", content=b"not an image", headers={"content-type": "image/png"})
        assert response.status_code == 401
    assert npu_client.get("/v1/model").status_code == 200
    assert npu_client.post("/v1/embed", **image).status_code == 200


def test_batch_decode_equals_replica_decode(client: httpx.Client, replica: VTPReplica) -> None:
    images = model_inputs(5)
    latents = replica.encode(images).latents  # 5 latents: more than max_batch_size (4), split by the replica queue
    expected = replica.decode(latents).astype(int)

    as_npy = client.post("/v1/decode", content=_npy(latents), headers={**_NPY, "accept": NPY})
    assert as_npy.status_code == 200, as_npy.text
    decoded = np.load(io.BytesIO(as_npy.content), allow_pickle=False)
    assert decoded.dtype == np.uint8 and decoded.shape == (5, SIZE, SIZE, 3)
    assert np.abs(decoded.astype(int) - expected).max() <= 1
    assert 1 <= int(as_npy.headers["x-vtp-batch-size"]) <= 4

    as_zip = client.post("/v1/decode", json=_latents_json(latents), headers={"accept": "application/zip"})
    assert as_zip.status_code == 200 and as_zip.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(as_zip.content)) as archive:
        names = archive.namelist()
        pngs = [png_array(archive.read(name)) for name in names]
    assert names == [f"{i:05d}.png" for i in range(5)]
    assert np.abs(np.stack(pngs).astype(int) - expected).max() <= 1

    as_multipart = client.post("/v1/decode", content=_npy(latents), headers={**_NPY, "accept": "multipart/mixed"})
    assert as_multipart.status_code == 200
    head = f"Content-Type: {as_multipart.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + as_multipart.content)
    parts = list(message.iter_parts())
    assert [part.get_filename() for part in parts] == names
    assert all(part.get_content_type() == "image/png" for part in parts)
    pngs = [png_array(part.get_payload(decode=True)) for part in parts]
    assert np.abs(np.stack(pngs).astype(int) - expected).max() <= 1
