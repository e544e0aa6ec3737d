"""The Serve application end to end: a local Ray, real HTTP on a free loopback port, the tiny fixture model.

Helpers shared with the other ``test_serve_*`` modules live at the top of this one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from deployments import AppArgs, build_app, compose_app
from vtp_ray import VTPReplica
from vtp_ray.images import preprocess
from vtp_ray.placement import PlacementError

TINY = str(Path(__file__).parent / "fixtures" / "vtp-tiny")
SIZE = 64  # the tiny model's training size
CHANNELS = 8
NPY = "application/x-npy"


# ------------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def random_image(height: int = 80, width: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def start_serve(**ray_init: Any) -> str:
    """Start a local Ray and Serve on a free loopback port; returns the base URL."""
    ray.init(include_dashboard=False, **ray_init)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def stop_serve() -> None:
    serve.shutdown()
    ray.shutdown()


async def _post_all(base_url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(*(client.post(**kwargs) for kwargs in requests))


def post_concurrently(base_url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send all ``requests`` (``httpx.AsyncClient.post`` kwargs) at once."""
    return asyncio.run(_post_all(base_url, requests))


# ----------------------------------------------------------------------------------------------- fixtures

MAX_BODY_BYTES = 300_000
MAX_PIXELS = 1_000_000
MAX_IMAGE_SIZE = 256


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    url = start_serve(num_cpus=4)
    args = AppArgs(
        model=TINY,
        image_size=SIZE,
        max_image_size=MAX_IMAGE_SIZE,
        max_batch_size=4,
        batch_wait_timeout_s=0.1,
        max_body_bytes=MAX_BODY_BYTES,
        max_pixels=MAX_PIXELS,
    )
    serve.run(compose_app(args), name="vtp", route_prefix="/")
    yield url
    stop_serve()


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


def test_env_vars_override_args() -> None:
    env = {"VTP_MODEL": "random:vtp-small", "VTP_PRECISION": "bf16", "VTP_DEVICE": "cpu", "VTP_API_KEY": "s3cret-key"}
    args = AppArgs.from_args({"model": TINY, "precision": "fp32"}, environ=env)
    assert (args.model, args.precision, args.device) == ("random:vtp-small", "bf16", "cpu")
    assert args.api_key is not None and args.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret" not in repr(args)
    assert AppArgs.from_args({"model": TINY}, environ={}).api_key is None


@pytest.mark.parametrize(
    "bad",
    [{"image_size": 100}, {"max_batch_size": 0}, {"batch_wait_timeout_s": -1}, {"image_size": 2048}, {"colour": 1}],
)
def test_bad_args_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AppArgs.from_args({"model": TINY, **bad}, environ={})


def test_explicit_npu_placement_fails_fast_naming_the_setting(base_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(PlacementError, match=r"applications\[\]\.args\.placement in serve_config\.yaml"):
        build_app({"model": TINY, "placement": {"resources": {"NPU": 1}}})
    assert time.monotonic() - started < 5


def test_health_and_model_info_auto_placement_on_cpu(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["model"] == "vtp-tiny" and info["model_spec"] == TINY
    assert info["random_weights"] is False and len(info["config_digest"]) > 0
    assert (info["device"], info["precision"]) == ("cpu", "fp32")  # auto placement: no NPU / GPU here
    assert (info["latent_channels"], info["embedding_dim"]) == (CHANNELS, 64)
    assert info["batching"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.1}
    assert info["limits"]["image_size"] == SIZE and info["limits"]["api_key_required"] is False


# ---------------------------------------------------------------------------------------------- round trips


def test_encode_equals_replica_tokenize(client: httpx.Client, png: bytes, replica: VTPReplica) -> None:
    expected = replica.tokenize(preprocess(png, size=SIZE)[None])
    response = post_image(client, "/v1/encode", png)
    assert response.status_code == 200, response.text
    assert response.headers["x-vtp-batch-size"] == "1"
    body = response.json()
    assert body["shape"] == [CHANNELS, SIZE // 16, SIZE // 16] and body["dtype"] == "float32"
    np.testing.assert_allclose(latents_of(response), expected["latents"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(body["clip_embedding"], expected["clip_embedding"][0], rtol=1e-5, atol=1e-5)

    as_npy = post_image(client, "/v1/encode", png, headers={"accept": NPY})
    assert as_npy.status_code == 200 and as_npy.headers["content-type"] == NPY
    assert as_npy.headers["x-vtp-batch-size"] == "1"
    np.testing.assert_array_equal(np.load(io.BytesIO(as_npy.content)), latents_of(response))


def test_encode_then_decode_equals_reconstruct(client: httpx.Client, png: bytes) -> None:
    reconstruction = post_image(client, "/v1/reconstruct", png)
    assert reconstruction.status_code == 200 and reconstruction.headers["content-type"] == "image/png"
    assert reconstruction.headers["x-vtp-batch-size"] == "1"
    stages = [entry.split(";dur=")[0].strip() for entry in reconstruction.headers["server-timing"].split(",")]
    assert stages == ["input", "queue", "model", "output"]
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
    expected = replica.tokenize(np.stack([preprocess(png_bytes(im), size=SIZE) for im in images]))["latents"]
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
    "latents shape rank": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, shape=[8, 16])}, 422, "shape"),
    "latents dtype": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, dtype="float16")}, 400, "dtype"),
    "latents not base64": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, latents="@@@")}, 400, "base64"),
    "latents bytes vs shape": ("/v1/decode", {"json": _latents_json(_GOOD_LATENTS, shape=[8, 4, 5])}, 400, "bytes"),
    "latents channels": ("/v1/decode", {"json": _latents_json(np.zeros((4, 4, 4), np.float32))}, 400, "shape"),
    "latents NaN": ("/v1/decode", {"json": _latents_json(_NAN_LATENTS)}, 400, "NaN"),
    "npy not a file": ("/v1/decode", {"content": b"\x93NUMPY garbage", "headers": _NPY}, 400, ".npy"),
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
