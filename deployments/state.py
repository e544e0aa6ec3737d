"""``IngressState``: the one object every route of an ingress replica reads (HTTP ``/v1``, the OIP over REST and
gRPC, the upload guard): the served models, the app's fixed settings and the live ``IngressConfig``. The ingress
builds it when it starts and installs it for its process (``install``; every Serve replica is a process of its
own), and replaces its ``config`` on ``reconfigure``; nothing else holds per-ingress state.

Why not FastAPI's ``app.state``: Serve pickles the ingress's FastAPI app by value into the replica, so the app that
serves requests is a copy the ingress's ``__init__`` cannot reach (it sees the module's own ``app``)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from vtp_ray.images import ImageLimits

from .errors import ApiError
from .model.selection import ModelSet
from .requests import image_limits
from .settings import AppSettings, IngressConfig

__all__ = ["IngressState", "ingress_state", "install", "installed"]

log = logging.getLogger("ray.serve")


@dataclass
class IngressState:
    """The models behind this ingress, the app's settings (fixed for the replica's life) and the live config."""

    models: ModelSet
    settings: AppSettings
    config: IngressConfig

    def reconfigure(self, changes: dict[str, Any] | None) -> None:
        """Apply a ``user_config`` over the app's groups (keys it leaves out keep the app's values); a config that
        does not validate raises, and Serve reports the deployment unhealthy with the message."""
        config = self.settings.ingress_config().merged(changes)
        if self.settings.image_size > config.limits.max_image_size:
            raise ValueError(
                f"limits.max_image_size {config.limits.max_image_size} is below image_size {self.settings.image_size}"
            )
        self.config = config
        self.models.wait_s = config.limits.model_wait_s
        log.info("ingress settings: %s", config.model_dump())

    @property
    def image_limits(self) -> ImageLimits:
        """What the image loader enforces on uploads (``max_body_bytes``, ``max_pixels``)."""
        return image_limits(self.config.limits)

    def authorize(self, authorization: str | None) -> None:
        """401 unless no API key is set or ``authorization`` (a header or gRPC metadata value) is ``Bearer <key>``;
        the key is compared in constant time."""
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.get_secret_value().encode()
        ):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer", "Connection": "close"},  # its body is never read
            )


_installed: IngressState | None = None


def install(state: IngressState) -> None:
    """Make ``state`` the state of this process's ingress (called by the ingress when it starts)."""
    global _installed
    _installed = state


def installed() -> IngressState | None:
    """This process's ingress state, None before the ingress has started."""
    return _installed


def ingress_state() -> IngressState:
    """The serving ingress's state (503 while the ingress starts): a FastAPI dependency of every route."""
    if _installed is None:
        raise ApiError(503, "not_ready", "the ingress is starting")
    return _installed
