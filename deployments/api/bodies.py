"""The JSON and .npy bodies only ``/v1`` accepts: latents to decode, texts to embed (image uploads and the shared
checks are in ``deployments.requests`` and ``deployments.texts``)."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from pydantic import ValidationError

from ..errors import ApiError, invalid_json
from ..settings import TextLimits
from ..texts import check_texts
from .responses import NPY_MEDIA_TYPE
from .schemas import EmbedTextRequest, LatentsPayload

__all__ = ["parse_embed_text", "parse_latents"]

_NPY_TYPES = (NPY_MEDIA_TYPE, "application/octet-stream")


def parse_embed_text(body: bytes, limits: TextLimits) -> tuple[str, ...]:
    """``{"texts": [...]}`` -> the texts, checked against ``limits``."""
    try:
        request = EmbedTextRequest.model_validate_json(body)
    except ValidationError as e:
        raise invalid_json(e, "request JSON") from e
    return check_texts(request.texts, limits)


def parse_latents(body: bytes, content_type: str) -> np.ndarray:
    """Latents from ``/v1/encode``'s JSON or a .npy file -> an array, not yet checked (see ``check_latents``)."""
    if content_type == "application/json":
        try:
            payload = LatentsPayload.model_validate_json(body)
        except ValidationError as e:
            raise invalid_json(e, "latents JSON") from e
        return _latents_from_payload(payload)
    if content_type in _NPY_TYPES:
        return _latents_from_npy(body)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'!r} is not accepted: send the JSON that /v1/encode returns "
        f"(application/json) or a .npy file ({NPY_MEDIA_TYPE})",
    )


def _latents_from_payload(payload: LatentsPayload) -> np.ndarray:
    if payload.dtype != "float32":
        raise ApiError(400, "bad_latents", f"latents dtype must be 'float32', got {payload.dtype!r}")
    try:
        raw = base64.b64decode(payload.latents, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_latents", f"latents is not valid base64: {e}") from e
    expected = int(np.prod(payload.shape, dtype=np.int64)) * 4
    if len(raw) != expected:
        raise ApiError(
            400,
            "bad_latents",
            f"latents hold {len(raw)} bytes but shape {payload.shape} of float32 needs {expected}",
        )
    return np.frombuffer(raw, dtype="<f4").reshape(payload.shape)


def _latents_from_npy(body: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError... for bad or pickled files
        raise ApiError(
            400, "bad_latents", f"body is not a .npy file of a plain numeric array ({type(e).__name__})"
        ) from e
    if not isinstance(array, np.ndarray):
        raise ApiError(400, "bad_latents", "body is not a .npy file of a single array")
    return array
