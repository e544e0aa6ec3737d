"""Turning HTTP requests into validated model inputs, before anything reaches the batch queue.

Everything here raises ``ApiError`` (status, machine-readable kind, human message) for bad input. Bodies are
read with a byte limit that is checked against ``Content-Length`` first and then while streaming, so an
oversized upload is refused before it is held in memory whole.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from vtp_ray.arrays import LatentsTooLarge, as_latent_batch
from vtp_ray.images import PATCH_SIZE, CropMode, ImageLimits, ImageLoadError, preprocess

from .schemas import LatentsPayload

NPY_MEDIA_TYPE = "application/x-npy"
_RAW_IMAGE_TYPES = ("application/octet-stream",)
_NPY_TYPES = (NPY_MEDIA_TYPE, "application/octet-stream")
_TOO_LARGE_REASONS = ("too_large_bytes", "too_many_pixels")


class ApiError(Exception):
    """A request the API refuses: HTTP ``status``, a short ``kind`` for metrics, and a message for the client."""

    def __init__(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers
        self.extra = extra  # more JSON fields of the error body (pydantic's ``detail`` for 422s)


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic's errors in one line: ``location: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors)


def invalid_json(error: ValidationError, what: str) -> ApiError:
    """422 for a JSON body pydantic refused: each error's location and message, and pydantic's own ``detail``."""
    errors = error.errors()
    return ApiError(422, "invalid_json", f"invalid {what}: {describe_errors(errors)}", detail=jsonable_encoder(errors))


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


def preprocess_upload(data: bytes, size: int, crop: CropMode, limits: ImageLimits, draft: bool = False) -> np.ndarray:
    """Encoded image -> the preprocessed uint8 (size, size, 3) model input. CPU work: call it off the event loop.

    ``draft`` decodes JPEGs at a reduced scale where the crop allows (faster, slightly different pixels).
    """
    try:
        return preprocess(data, size=size, crop=crop, limits=limits, draft=draft)
    except ImageLoadError as e:
        status = 413 if e.reason in _TOO_LARGE_REASONS else 400
        raise ApiError(status, f"image_{e.reason}", str(e)) from e


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


def check_latents(
    latents: np.ndarray, channels: int, max_side: int, max_batch: int = 1, max_pixels: int | None = None
) -> np.ndarray:
    """One image's latents ``(C, h, w)`` or a batch ``(N, C, h, w)``, any float dtype and byte order -> native
    float32 ``(N, C, h, w)``: at most ``max_batch`` of them, each decoding to an image no larger than ``max_side``
    pixels a side, ``max_pixels`` output pixels in all."""
    batch = latents[None] if latents.ndim == 3 else latents
    if batch.ndim == 4 and len(batch) > max_batch:
        raise ApiError(413, "too_large", f"{len(batch)} latents in one request, over the limit of {max_batch} "
                       "(max_decode_batch): split the batch")  # fmt: skip
    try:
        batch = as_latent_batch(batch, channels, max_side)
    except LatentsTooLarge as e:
        raise ApiError(413, "too_large", f"{e} (max_image_size)") from e
    except (TypeError, ValueError) as e:
        raise ApiError(400, "bad_latents", str(e)) from e
    n, _, h, w = batch.shape
    pixels = n * h * w * PATCH_SIZE * PATCH_SIZE
    if max_pixels is not None and pixels > max_pixels:
        raise ApiError(413, "too_large", f"{n} latents decode to {pixels} pixels, over the limit of {max_pixels} "
                       "(max_decode_pixels): split the batch")  # fmt: skip
    return batch
