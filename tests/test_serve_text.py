"""``/v1/embed-text`` and ``/v1/classify`` end to end: the shared local Ray, real HTTP on loopback, the tinytext
model (the real CLIP vocabulary). Results are compared with an in-process ``VTPReplica`` (rtol 1e-5)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from helpers import SIZE, TINYTEXT, UNLIMITED, png_bytes, post_concurrently, random_image
from serving import ServeInstance, deploy

from deployments import AppSettings, compose_app
from vtp_ray import VTPReplica
from vtp_ray.images import preprocess
from vtp_ray.text.classifier import class_embeddings
from vtp_ray.text.imagenet import imagenet_templates

pytestmark = pytest.mark.slow

LABELS = ["cat", "dog", "a red car", "café"]


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance) -> str:
    args = AppSettings(
        model=TINYTEXT,
        image_size=SIZE,
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        placement="cpu",
        max_texts=5,
        max_labels=6,
        label_cache_size=2,
        rate_limits=UNLIMITED,
    )
    return deploy(compose_app(args), "vtp-text", "/")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    return VTPReplica(TINYTEXT, device="cpu", warmup_size=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return random_image(90, 70, seed=3)


def test_embed_text_matches_the_replica(client: httpx.Client, replica: VTPReplica) -> None:
    texts = ["a photo of a cat.", "&amp; émoji 🐱", ""]
    response = client.post("/v1/embed-text", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 32 and len(body["embeddings"]) == 3
    np.testing.assert_allclose(np.array(body["embeddings"]), replica.embed_text(texts), rtol=1e-5, atol=1e-6)


def test_concurrent_text_requests_share_a_model_call_and_never_one_with_images(
    base_url: str, replica: VTPReplica, image: np.ndarray
) -> None:
    texts = [[f"text {i}", f"another {i}"] for i in range(6)]
    requests = [{"url": "/v1/embed-text", "json": {"texts": t}} for t in texts]
    requests += [{"url": "/v1/embed", "content": png_bytes(image), "headers": {"content-type": "image/png"}}] * 3
    responses = post_concurrently(base_url, requests)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    text_batches = [int(r.headers["x-vtp-batch-size"]) for r in responses[:6]]
    assert max(text_batches) > 1  # requests shared a model call
    assert all(b <= 6 for b in text_batches)  # ... of text requests only: the 3 images never join them
    for response, t in zip(responses[:6], texts, strict=True):
        np.testing.assert_allclose(response.json()["embeddings"], replica.embed_text(t), rtol=1e-5, atol=1e-6)


def _expected(replica: VTPReplica, image: np.ndarray, labels: list[str], templates: tuple[str, ...]) -> dict:
    pixels = preprocess(png_bytes(image), size=SIZE)[None]
    scores = replica.classify(pixels, class_embeddings(replica.embed_text, labels, templates))
    return dict(zip(labels, scores.probabilities[0].tolist(), strict=True))


def _check(body: dict, expected: dict) -> None:
    got = {entry["label"]: entry["probability"] for entry in body["labels"]}
    assert list(got) == sorted(expected, key=expected.get, reverse=True)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-7)
    assert body["activation"] == "softmax" and abs(sum(got.values()) - 1) < 1e-5


def test_classify_raw_body_query_labels_and_cache(client: httpx.Client, replica: VTPReplica, image: np.ndarray) -> None:
    expected = _expected(replica, image, LABELS, ("a photo of a {}.",))
    params = [("labels", label) for label in LABELS]
    headers = {"content-type": "image/png"}
    first = client.post("/v1/classify", params=params, content=png_bytes(image), headers=headers)
    assert first.status_code == 200, first.text
    _check(first.json(), expected)
    assert first.json()["templates"] == 1
    second = client.post("/v1/classify", params=params, content=png_bytes(image), headers=headers)
    assert second.headers["x-vtp-label-cache"] == "hit" and second.json() == first.json()


def test_classify_multipart_json_field_and_templates(
    client: httpx.Client, replica: VTPReplica, image: np.ndarray
) -> None:
    templates = ["a drawing of a {}.", "{}"]
    files = {"image": ("x.png", png_bytes(image), "image/png")}
    data = {"labels": json.dumps(LABELS[:3]), "templates": json.dumps(templates)}
    response = client.post("/v1/classify", files=files, data=data)
    assert response.status_code == 200, response.text
    _check(response.json(), _expected(replica, image, LABELS[:3], tuple(templates)))
    repeated = client.post("/v1/classify", files=files, data={"labels": LABELS[:3], "templates": templates})
    assert repeated.json() == response.json()


def test_classify_imagenet_template_set(client: httpx.Client, replica: VTPReplica, image: np.ndarray) -> None:
    files = {"image": ("x.png", png_bytes(image), "image/png")}
    response = client.post("/v1/classify", files=files, data={"labels": ["cat", "dog"], "template_set": "imagenet"})
    assert response.status_code == 200, response.text
    assert response.json()["templates"] == 80
    _check(response.json(), _expected(replica, image, ["cat", "dog"], imagenet_templates()))


@pytest.mark.parametrize(
    ("url", "kwargs", "says"),
    [
        ("/v1/embed-text", {"json": {"texts": []}}, "non-empty"),
        ("/v1/embed-text", {"json": {"texts": ["a"] * 6}}, "limit is 5"),
        ("/v1/embed-text", {"json": {"texts": ["a", 3]}}, "texts.1"),
        ("/v1/embed-text", {"content": b"not json", "headers": {"content-type": "application/json"}}, "invalid"),
        ("/v1/classify", {"data": {}}, "non-empty"),
        ("/v1/classify", {"data": {"labels": [str(i) for i in range(7)]}}, "limit is 6"),
        ("/v1/classify", {"data": {"labels": '["a", 3]'}}, "not a string"),
        ("/v1/classify", {"data": {"labels": "a", "templates": "no placeholder"}}, "{}"),
        ("/v1/classify", {"data": {"labels": "a", "template_set": "nope"}}, "template_set"),
    ],
)
def test_bad_text_input_is_a_422(client: httpx.Client, image: np.ndarray, url: str, kwargs: dict, says: str) -> None:
    if url == "/v1/classify":
        kwargs = {**kwargs, "files": {"image": ("x.png", png_bytes(image), "image/png")}}
    response = client.post(url, **kwargs)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"] and isinstance(response.json()["error"], str)


def test_bad_requests_leave_batch_mates_alone(base_url: str, replica: VTPReplica) -> None:
    good = {"url": "/v1/embed-text", "json": {"texts": ["fine"]}}
    bad = {"url": "/v1/embed-text", "json": {"texts": ["fine", None]}}
    responses = post_concurrently(base_url, [good, bad, good, bad, good])
    assert [r.status_code for r in responses] == [200, 422, 200, 422, 200]
    for r in responses[::2]:
        np.testing.assert_allclose(r.json()["embeddings"], replica.embed_text(["fine"]), rtol=1e-5, atol=1e-6)


def test_openapi_shows_both_endpoints(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "application/json" in paths["/v1/embed-text"]["post"]["requestBody"]["content"]
    form = paths["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "labels", "templates", "template_set"} <= set(form["properties"])
    model = client.get("/v1/model").json()
    assert model["zero_shot_activation"] == "softmax" and model["text_context_length"] == 77
