"""The HTTP API (``/v1``, the page at ``/``): ``service`` (health, readiness, models), ``images`` (reconstruct,
encode, embed, preprocess, decode), ``text`` (embed-text, classify), each route built on ``calls`` (model choice,
uploads, model calls), ``bodies`` (the JSON / .npy bodies), ``responses`` (PNG, .npy, zip, multipart, Server-Timing),
``schemas`` and ``openapi`` (what /docs shows); ``uploads`` bounds how bodies arrive; ``page`` serves the page."""

from fastapi import FastAPI

from . import images, page, service, text

__all__ = ["attach_routers"]


def attach_routers(app: FastAPI) -> None:
    """Serve ``/v1``, the health routes and the page from ``app``."""
    for module in (service, images, text, page):
        app.include_router(module.router)
