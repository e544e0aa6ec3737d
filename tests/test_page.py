"""The page (``GET /``, ``/ui``) in a real headless Chromium against the Serve app over loopback HTTP, and the
request-path options that came with it: ``/v1/preprocess``, ``?preprocess=`` and the finer ``Server-Timing``.

One app (the tiny model, an API key set) serves every test here. The browser test needs Debian's ``chromium``
(``apt-get install chromium``) and the ``playwright`` package; it is skipped, saying so, where either is missing.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import CHANNELS, SIZE, TINY, png_array, random_image
from PIL import Image
from serving import ServeInstance, deploy

from deployments import AppSettings, compose_app
from deployments.api.page import page_html
from vtp_ray.images import preprocess
from vtp_ray.metrics import psnr

KEY = "page-key-123"
AUTH = {"authorization": f"Bearer {KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def smooth_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG (gradients and a block): what draft decoding is for."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 17.0)], axis=-1) * 255
    image[height // 4 : height // 2, width // 3 : width // 2] = (200, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_the_page_is_self_contained() -> None:
    html = page_html()
    assert "<script>" in html and "/v1/encode" in html and "/v1/decode" in html
    # Nothing loaded from another host: no CDN, so the page works on machines without internet.
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert not re.findall(r"""(?:import|fetch)\s*\(\s*["'](?:https?:)?//""", html)


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance) -> str:
    args = AppSettings(model=TINY, image_size=SIZE, placement="cpu", api_key=KEY, max_image_size=256)
    return deploy(compose_app(args), "vtp-page", "/")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.mark.slow
def test_page_is_served_without_the_key(client: httpx.Client) -> None:
    for path in ("/", "/ui"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert response.text == page_html()
    assert client.get("/v1/model").status_code == 401  # the API itself still needs it


@pytest.mark.slow
def test_preprocess_returns_the_model_input_and_timings(client: httpx.Client) -> None:
    data = smooth_jpeg(120, 90)
    response = client.post("/v1/preprocess?crop=center", content=data, headers={"content-type": "image/jpeg", **AUTH})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(png_array(response.content), preprocess(data, size=SIZE))
    assert client.post("/v1/preprocess", content=data, headers={"content-type": "image/jpeg"}).status_code == 401

    response = client.post("/v1/reconstruct", content=data, headers={"content-type": "image/jpeg", **AUTH})
    stages = dict(entry.strip().split(";dur=") for entry in response.headers["server-timing"].split(","))
    assert list(stages) == ["read", "preprocess", "hop", "queue", "model", "output"]
    assert all(float(ms) >= 0 for ms in stages.values())


@pytest.mark.slow
def test_fast_preprocess_option(client: httpx.Client) -> None:
    data = smooth_jpeg(1200, 900)  # 4x the side of the 256-px crop asked for: draft loading can scale by 1/4
    url = "/v1/preprocess?size=256&preprocess="
    headers = {"content-type": "image/jpeg", **AUTH}
    exact = client.post(url + "exact", content=data, headers=headers)
    np.testing.assert_array_equal(png_array(exact.content), preprocess(data, size=256))
    assert client.post(url + "sloppy", content=data, headers=headers).status_code == 422
    fast = client.post(url + "fast", content=data, headers=headers)
    assert fast.status_code == 200, fast.text
    difference = np.abs(png_array(fast.content).astype(int) - png_array(exact.content).astype(int))
    assert difference.mean() < 3, f"draft loading moved pixels by {difference.mean():.2f} levels on average"
    # ?decode= is the option's former name, and still works; the two disagreeing is an error
    old = client.post("/v1/preprocess?size=256&decode=fast", content=data, headers=headers)
    assert old.status_code == 200 and old.content == fast.content
    both = client.post("/v1/preprocess?size=256&decode=fast&preprocess=exact", content=data, headers=headers)
    assert both.status_code == 400 and "disagree" in both.json()["error"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium")
def test_the_page_in_a_browser(base_url: str, client: httpx.Client, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    image = random_image(80, 100, seed=3)
    upload = tmp_path / "upload.png"
    Image.fromarray(image).save(upload)
    # What the page must show, computed here from the API's own answers.
    headers = {"content-type": "image/png", **AUTH}
    crop = png_array(client.post("/v1/preprocess", content=upload.read_bytes(), headers=headers).content)
    recon = png_array(client.post("/v1/reconstruct", content=upload.read_bytes(), headers=headers).content)
    expected_psnr = float(psnr(crop[None], recon[None])[0])

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base_url + "/ui")
            assert page.title() == "VTP visual tokenizer"
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')", timeout=60_000)
            page.set_input_files("#file", str(upload))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)

            assert page.eval_on_selector("#input", "c => [c.width, c.height]") == [SIZE, SIZE]
            assert page.eval_on_selector("#reconstruction", "c => [c.width, c.height]") == [SIZE, SIZE]
            shown_crop = page.evaluate(
                "Array.from(document.getElementById('input').getContext('2d').getImageData(0, 0, 64, 64).data)"
            )
            np.testing.assert_array_equal(np.array(shown_crop, dtype=np.uint8).reshape(SIZE, SIZE, 4)[..., :3], crop)
            assert float(page.text_content("#psnr")) == pytest.approx(expected_psnr, abs=0.01)
            side = SIZE // 16
            assert (
                page.eval_on_selector_all("#latents canvas", "cs => cs.map(c => [c.width, c.height])")
                == [[side, side]] * CHANNELS
            )
            # No text encoder on this server: the labels part says so instead of failing.
            page.wait_for_function("document.getElementById('labels-status').textContent.length > 0", timeout=60_000)
            assert "no text encoder" in page.text_content("#labels-status")
            assert "server-timing" not in (page.text_content("#timings") or "")
            assert "model;dur=" in page.text_content("#timings")
            assert errors == []
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # The OpenAPI page works without internet: every request it makes goes to this server, and it shows
            # the API's operations.
            hosts: set[str] = set()
            page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
            page.goto(base_url + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=60_000)
            paths = page.eval_on_selector_all(".opblock-summary-path", "es => es.map(e => e.textContent)")
            assert "/v1/reconstruct" in paths and "/v2/models/{oip_model}/infer" in paths
            assert hosts == {base_url.split("/")[2]}, hosts
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0
