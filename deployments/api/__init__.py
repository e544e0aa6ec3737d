"""The HTTP API: ``/v1``, the health routes and the page, each route a thin function over ``calls`` (the
model, the key, the upload, the call); ``uploads`` bounds how bodies arrive."""

from fastapi import FastAPI

from . import images, page, service, text

__all__ = ["attach_routers"]


def attach_routers(app: FastAPI) -> None:
    """Serve ``/v1``, the health routes and the page from ``app``."""
    for module in (service, images, text, page):
        app.include_router(module.router)
