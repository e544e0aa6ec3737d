"""What every ``/v1`` model route does around its own work: pick the model, authorize, read and preprocess the
upload, call the model deployment, and say where the time went."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, Header, Request

from vtp_ray.images import CropMode

from ..callers import Caller
from ..errors import ApiError, unsupported
from ..model.protocol import Outcome, Verb
from ..model.selection import MODEL_HEADER, requested_model
from ..requests import check_size, preprocess_upload, read_image_upload
from ..state import IngressState, ingress_state
from . import openapi
from .responses import timed


@dataclass
class Call:
    """One ``/v1`` request: its ingress state, the served model it picked, who asked, and its Server-Timing stages
    (ms)."""

    state: IngressState
    model: str
    caller: Caller
    timings: dict[str, float] = field(default_factory=dict)

    async def info(self) -> dict[str, Any]:
        """The model's ``ReplicaInfo`` dict (cached after the first answer)."""
        return await self.state.models.info(self.model)

    async def require(self, verb: str) -> None:
        """501 when the model's checkpoint cannot serve ``verb`` (no CLIP head, no text vocabulary)."""
        if (error := unsupported(verb, await self.info())) is not None:
            raise error

    async def image(
        self, request: Request, size: int | None, crop: CropMode, preprocess: openapi.PreprocessMode | None
    ) -> np.ndarray:
        """Read the upload (``read`` in Server-Timing), load and crop it (``preprocess``) -> uint8 (size, size, 3)."""
        config = self.state.config
        side = self.side(size)
        fast = config.preprocess.fast if preprocess is None else preprocess == "fast"
        with timed(self.timings, "read"):
            data = await read_image_upload(request, config.limits.max_body_bytes)
        with timed(self.timings, "preprocess"):
            return await asyncio.to_thread(preprocess_upload, data, side, crop, self.state.image_limits, fast)

    def side(self, size: int | None) -> int:
        """The requested model input side (default ``image_size``), checked against ``max_image_size``."""
        return check_size(
            self.state.settings.image_size if size is None else size, self.state.config.limits.max_image_size
        )

    async def run(self, verb: Verb, array: np.ndarray | tuple[str, ...]) -> Outcome:
        """One input through the model's batch queue (``hop`` in Server-Timing: the round trip less the replica)."""
        with timed(self.timings, "call"):
            return await self.call("run", verb, array)

    async def call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on a replica of the picked model."""
        return await self.state.models.call(self.model, method, *args)


STATE = Depends(ingress_state)


async def model_call(
    request: Request,
    state: IngressState = STATE,
    model: str | None = openapi.MODEL,
    x_vtp_model: str | None = Header(None, description=f"the model to use, as ?model= ({MODEL_HEADER})"),
) -> Call:
    """A FastAPI dependency: the API key checked, the requested model resolved (``?model=`` wins over the header)."""
    caller = state.http_caller(request.scope)
    state.authorize(caller)
    name = state.models.resolve(requested_model({"model": model or ""}, {MODEL_HEADER: x_vtp_model or ""}))
    return Call(state, name, caller)


async def preprocess_mode(
    preprocess: openapi.PreprocessMode | None = openapi.PREPROCESS,
    decode: openapi.PreprocessMode | None = openapi.DECODE,
) -> openapi.PreprocessMode | None:
    """``?preprocess=exact|fast``, or its former name ``?decode=``."""
    if preprocess is not None and decode is not None and preprocess != decode:
        raise ApiError(400, "bad_request", "?preprocess= and its former name ?decode= disagree: send one")
    return preprocess or decode


MODEL_CALL = Depends(model_call)
PREPROCESS_MODE = Depends(preprocess_mode)
