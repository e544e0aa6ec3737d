"""The page at ``GET /`` and ``GET /ui``: one static HTML file that uses the HTTP API from the browser.

The page is plain HTML and JavaScript (``static/index.html``, packaged with ``deployments``): no build step and
nothing fetched from another host, so it works on machines without internet. It holds no secret and never needs
the API key itself; the key the user types is sent by the page's own API calls.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@functools.cache
def page_html() -> str:
    """The page's HTML, read once from the package."""
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The page: drop an image, see its crop, its reconstruction with PSNR, its latents and nearest labels."""
    return HTMLResponse(page_html(), headers={"cache-control": "no-cache"})
