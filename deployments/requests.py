"""Turning requests into validated model inputs, before anything reaches the batch queue (shared by the HTTP API
and the Open Inference Protocol).

Everything here raises ``ApiError`` (status, machine-readable kind, human message) for bad input. Bodies are
read with a byte limit that is checked against ``Content-Length`` first and then while streaming, so an
oversized upload is refused before it is held in memory whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from vtp_ray.arrays import LatentsTooLarge, as_latent_batch
from vtp_ray.images import PATCH_SIZE, CropMode, ImageLimits, ImageLoadError, preprocess

from .errors import ApiError
from .settings import Limits

_RAW_IMAGE_TYPES = ("application/octet-stream",)
_TOO_LARGE_REASONS = ("too_large_bytes", "too_many_pixels")


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (``""`` when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _too_large(size: int | str, limit: int) -> NoReturn:
    raise ApiError(413, "too_large", f"request body is {size} bytes, over the limit of {limit} (max_body_bytes)")


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            _too_large(declared, limit)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            _too_large(f"more than {limit}", limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    return b"".join([chunk async for chunk in _limited_stream(request, limit)])


async def read_image_upload(request: Request, limit: int) -> bytes:
    """The encoded image of a raw ``image/*`` body or of the multipart field ``image``."""
    return (await read_image_and_fields(request, limit))[0]


async def read_image_and_fields(
    request: Request, limit: int, max_fields: int = 16
) -> tuple[bytes, dict[str, list[str]]]:
    """The encoded image (raw ``image/*`` body or multipart field ``image``) and the multipart body's text fields
    (none for a raw body), each name with its values in order."""
    kind = media_type(request)
    if kind.startswith("image/") or kind in _RAW_IMAGE_TYPES:
        return await read_body(request, limit), {}
    if kind == "multipart/form-data":
        stream = _limited_stream(request, limit)
        parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=max_fields)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from e
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "bad_multipart", "the multipart body has no file field named 'image'")
            fields: dict[str, list[str]] = {}
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields.setdefault(name, []).append(value)
            return await upload.read(), fields
        finally:
            await form.close()
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {kind or '(none)'!r} is not accepted: send the image as the raw body with "
        "Content-Type image/<format>, or as the multipart/form-data file field 'image'",
    )


def check_size(size: int, max_size: int) -> int:
    """A requested model input side: a positive multiple of the patch size, at most ``max_size``."""
    if size <= 0 or size % PATCH_SIZE or size > max_size:
        raise ApiError(
            400, "bad_size", f"size must be a multiple of {PATCH_SIZE} between {PATCH_SIZE} and {max_size}, got {size}"
        )
    return size


def image_limits(limits: Limits) -> ImageLimits:
    """What the image loader enforces on an upload: the request's byte limit and the pixel limit."""
    return ImageLimits(max_bytes=limits.max_body_bytes, max_pixels=limits.max_pixels)


def preprocess_upload(data: bytes, size: int, crop: CropMode, limits: ImageLimits, fast: bool = False) -> np.ndarray:
    """Encoded image -> the preprocessed uint8 (size, size, 3) model input. CPU work: call it off the event loop.

    ``fast`` loads JPEGs at a reduced scale where the crop allows (Pillow's draft mode: faster, slightly different
    pixels).
    """
    try:
        return preprocess(data, size=size, crop=crop, limits=limits, draft=fast)
    except ImageLoadError as e:
        status = 413 if e.reason in _TOO_LARGE_REASONS else 400
        raise ApiError(status, f"image_{e.reason}", str(e)) from e


def check_latents(latents: np.ndarray, channels: int, limits: Limits) -> np.ndarray:
    """One image's latents ``(C, h, w)`` or a batch ``(N, C, h, w)``, any float dtype and byte order -> native
    float32 ``(N, C, h, w)``: at most ``limits.max_decode_batch`` of them, each decoding to an image no larger than
    ``limits.max_image_size`` a side, ``limits.max_decode_pixels`` output pixels in all. Every route that decodes
    checks with this, so the limits cannot differ between them."""
    batch = latents[None] if latents.ndim == 3 else latents
    if batch.ndim == 4 and len(batch) > limits.max_decode_batch:
        raise ApiError(413, "too_large", f"{len(batch)} latents in one request, over the limit of "
                       f"{limits.max_decode_batch} (max_decode_batch): split the batch")  # fmt: skip
    try:
        batch = as_latent_batch(batch, channels, limits.max_image_size)
    except LatentsTooLarge as e:
        raise ApiError(413, "too_large", f"{e} (max_image_size)") from e
    except (TypeError, ValueError) as e:
        raise ApiError(400, "bad_latents", str(e)) from e
    n, _, h, w = batch.shape
    pixels = n * h * w * PATCH_SIZE * PATCH_SIZE
    if pixels > limits.max_decode_pixels:
        raise ApiError(413, "too_large", f"{n} latents decode to {pixels} pixels, over the limit of "
                       f"{limits.max_decode_pixels} (max_decode_pixels): split the batch")  # fmt: skip
    return batch
