"""``/v1``'s image routes: reconstruct, encode, embed, preprocess (image in) and decode (latents in)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vtp_ray.images import CropMode, to_png_bytes

from ..requests import check_latents, media_type, read_body
from . import openapi
from .bodies import parse_latents
from .calls import MODEL_CALL, PREPROCESS_MODE, Call
from .responses import MULTIPART, NPY_MEDIA_TYPE, ZIP, encode_images, served_headers, slowest, timed
from .schemas import EmbedResponse, EncodeResponse

router = APIRouter(prefix="/v1")


@router.post(
    "/reconstruct",
    response_class=Response,
    responses={**openapi.PNG, **openapi.ERRORS},
    openapi_extra=openapi.IMAGE_BODY,
)
async def reconstruct(
    request: Request,
    size: int | None = openapi.SIZE,
    crop: CropMode = openapi.CROP,
    preprocess: openapi.PreprocessMode | None = PREPROCESS_MODE,
    call: Call = MODEL_CALL,
) -> Response:
    """Encode and decode the preprocessed image; returns the reconstruction as PNG."""
    image = await call.image(request, size, crop, preprocess)
    outcome = await call.run("reconstruct", image)
    with timed(call.timings, "output"):
        png = await asyncio.to_thread(to_png_bytes, outcome.value)
    return Response(png, media_type="image/png", headers=served_headers(outcome, call.timings))


@router.post(
    "/encode",
    response_model=EncodeResponse,
    responses={200: {"content": {NPY_MEDIA_TYPE: {}}}, **openapi.ERRORS},
    openapi_extra=openapi.IMAGE_BODY,
)
async def encode(
    request: Request,
    size: int | None = openapi.SIZE,
    crop: CropMode = openapi.CROP,
    preprocess: openapi.PreprocessMode | None = PREPROCESS_MODE,
    call: Call = MODEL_CALL,
) -> Response:
    """Latents (C, h, w) and CLIP embedding as JSON, or the latents as .npy with ``Accept: application/x-npy``."""
    image = await call.image(request, size, crop, preprocess)
    outcome = await call.run("encode", image)
    latents, clip = outcome.value.latents, outcome.value.clip_embedding
    latents = np.ascontiguousarray(latents, dtype="<f4")
    headers = served_headers(outcome, call.timings)
    if NPY_MEDIA_TYPE in request.headers.get("accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, latents, allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY_MEDIA_TYPE, headers=headers)
    body = EncodeResponse(
        shape=list(latents.shape),
        latents=base64.b64encode(latents.tobytes()).decode("ascii"),
        clip_embedding=None if clip is None else clip.tolist(),
    )
    return JSONResponse(body.model_dump(), headers=headers)


@router.post(
    "/decode",
    response_class=Response,
    responses={**openapi.DECODED, **openapi.ERRORS},
    openapi_extra=openapi.LATENTS_BODY,
)
async def decode(request: Request, call: Call = MODEL_CALL) -> Response:
    """Latents (the JSON ``/v1/encode`` returns, or a .npy file), one ``(C, h, w)`` or a batch ``(N, C, h, w)``
    -> the images: PNG for one; by ``Accept``, an .npy of uint8 ``(N, H, W, 3)`` (the default for a batch), a
    zip or a ``multipart/mixed`` of PNGs. Each latent is one entry of the replica's batch queue."""
    limits = call.state.config.limits
    with timed(call.timings, "input"):
        body = await read_body(request, limits.max_body_bytes)
        latents = parse_latents(body, media_type(request))
        latents = check_latents(latents, (await call.info())["latent_channels"], limits)
    accept = request.headers.get("accept", "")
    kind = next(
        (k for k in (NPY_MEDIA_TYPE, ZIP, MULTIPART) if k in accept),
        "image/png" if len(latents) == 1 else NPY_MEDIA_TYPE,
    )
    if len(latents) == 1 and kind == "image/png":
        outcome = await call.run("decode", latents[0])
        with timed(call.timings, "output"):
            png = await asyncio.to_thread(to_png_bytes, outcome.value)
        return Response(png, media_type="image/png", headers=served_headers(outcome, call.timings))
    outcomes = await call.call("run_many", "decode", latents)
    with timed(call.timings, "output"):
        content, media = await asyncio.to_thread(encode_images, [o.value for o in outcomes], kind)
    return Response(content, media_type=media, headers=served_headers(slowest(outcomes), call.timings))


@router.post("/embed", response_model=EmbedResponse, responses=openapi.ERRORS, openapi_extra=openapi.IMAGE_BODY)
async def embed(
    request: Request,
    size: int | None = openapi.SIZE,
    crop: CropMode = openapi.CROP,
    preprocess: openapi.PreprocessMode | None = PREPROCESS_MODE,
    call: Call = MODEL_CALL,
) -> Response:
    """The normalized CLIP image embedding."""
    image = await call.image(request, size, crop, preprocess)
    await call.require("embed")
    outcome = await call.run("embed", image)
    body = EmbedResponse(embedding=outcome.value.tolist(), dim=len(outcome.value))
    return JSONResponse(body.model_dump(), headers=served_headers(outcome, call.timings))


@router.post(
    "/preprocess",
    response_class=Response,
    responses={**openapi.PNG, **openapi.ERRORS},
    openapi_extra=openapi.IMAGE_BODY,
)
async def preprocess_image(
    request: Request,
    size: int | None = openapi.SIZE,
    crop: CropMode = openapi.CROP,
    preprocess: openapi.PreprocessMode | None = PREPROCESS_MODE,
    call: Call = MODEL_CALL,
) -> Response:
    """The model input the other endpoints would make of this image (loaded and cropped), as PNG.

    No model call: it shows what the model sees, and is what a reconstruction is compared with (PSNR).
    """
    image = await call.image(request, size, crop, preprocess)
    with timed(call.timings, "output"):
        png = await asyncio.to_thread(to_png_bytes, image)
    return Response(png, media_type="image/png", headers=served_headers(None, call.timings))
