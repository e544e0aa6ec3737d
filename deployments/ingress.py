"""The HTTP ingress: a thin FastAPI app that validates, decodes and encodes, and leaves the model to ``VTPReplica``.

Requests are checked (API key, content type, byte and pixel limits, image decoding, latents) here, before they
reach the model deployment's batch queue, so a bad request never fails its batch-mates. Decoding and PNG
encoding are CPU work and run in threads, so the event loop keeps accepting requests meanwhile.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the routes' parameters on the
# methods Serve rebinds, and string annotations are not resolved there.
import asyncio
import base64
import contextlib
import hmac
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from vtp_ray import __version__
from vtp_ray.images import CropMode, DecodeLimits, to_png_bytes

from . import metrics
from .inputs import (
    NPY_MEDIA_TYPE,
    ApiError,
    check_latents,
    check_size,
    media_type,
    parse_latents,
    preprocess_upload,
    read_body,
    read_image_upload,
)
from .protocol import Outcome, Verb
from .schemas import EmbedResponse, EncodeResponse, ErrorResponse, Health, LatentsPayload, Limits, ModelInfo
from .uploads import UploadGuard, UploadPolicy

BATCH_SIZE_HEADER = "x-vtp-batch-size"


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress enforces; see ``AppArgs`` for the meaning of each field."""

    image_size: int
    max_image_size: int
    max_body_bytes: int
    max_pixels: int
    api_key: str | None = None
    uploads: UploadPolicy | None = None  # body deadline and per-client upload cap (uploads.py)


app = FastAPI(
    title="VTP visual tokenizer",
    version=__version__,
    description="Image in; reconstruction, latents or CLIP embedding out. Errors are JSON {'error': ...}.",
)

app.add_middleware(UploadGuard)

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": _BINARY,
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": _BINARY["schema"]}, "required": ["image"]}
            },
        },
    }
}
_LATENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": LatentsPayload.model_json_schema()}, NPY_MEDIA_TYPE: _BINARY},
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503)
}
_PNG = {200: {"content": {"image/png": {}}, "description": "the image as PNG"}}
_SIZE = Query(None, description="side of the square model input (multiple of 16); default: image_size")
_CROP = Query("center", description="center: ADM center crop (as in training); resize: squash to a square")


def _error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    metrics.errors().inc(tags={"kind": kind})
    return JSONResponse({"error": message, **extra}, status_code=status)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = _error_response(exc.status, exc.kind, exc.message, **exc.extra)
    response.headers.update(exc.headers or {})
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return _error_response(422, "invalid_request", f"invalid request: {summary}", detail=jsonable_encoder(errors))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = (time.perf_counter() - started) * 1000


def _headers(outcome: Outcome, timings: dict[str, float]) -> dict[str, str]:
    """``x-vtp-batch-size``, and a ``Server-Timing`` header saying where the request's time went (ms)."""
    stages = {**timings, "queue": outcome.queue_ms, "model": outcome.model_ms}
    ordered = (name for name in ("input", "queue", "model", "output") if name in stages)
    return {
        BATCH_SIZE_HEADER: str(outcome.batch_size),
        "server-timing": ", ".join(f"{name};dur={stages[name]:.1f}" for name in ordered),
    }


# A request holds an ingress slot while its body arrives (up to body_timeout_s): slots are cheap (no model work,
# which the model deployment's own queue bounds), so there are many, and max_uploads_per_client caps one client's.
@serve.deployment(name="VTPIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class VTPIngress:
    """HTTP API in front of the ``VTPReplica`` deployment."""

    def __init__(self, model: DeploymentHandle, settings: IngressSettings) -> None:
        self._model = model
        self._settings = settings
        self._limits = DecodeLimits(max_bytes=settings.max_body_bytes, max_pixels=settings.max_pixels)
        self._model_info: dict[str, Any] | None = None
        app.state.uploads = settings.uploads  # read by the UploadGuard middleware

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness of the HTTP path; never needs the API key."""
        return Health()

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model(self, request: Request) -> ModelInfo:
        """The model, device, precision and batch settings of the replica that answers."""
        self._authorize(request)
        info = await self._call_model("info")
        s = self._settings
        limits = Limits(
            image_size=s.image_size,
            max_image_size=s.max_image_size,
            max_body_bytes=s.max_body_bytes,
            max_pixels=s.max_pixels,
            api_key_required=s.api_key is not None,
        )
        return ModelInfo(**info, limits=limits)

    @app.post("/v1/reconstruct", response_class=Response, responses={**_PNG, **_ERRORS}, openapi_extra=_IMAGE_BODY)
    async def reconstruct(self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP) -> Response:
        """Encode and decode the preprocessed image; returns the reconstruction as PNG."""
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            image = await self._image_input(request, size, crop)
        outcome = await self._run("reconstruct", image)
        with _timed(timings, "output"):
            png = await asyncio.to_thread(to_png_bytes, outcome.value)
        return Response(png, media_type="image/png", headers=_headers(outcome, timings))

    @app.post(
        "/v1/encode",
        response_model=EncodeResponse,
        responses={200: {"content": {NPY_MEDIA_TYPE: {}}}, **_ERRORS},
        openapi_extra=_IMAGE_BODY,
    )
    async def encode(self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP) -> Response:
        """Latents (C, h, w) and CLIP embedding as JSON, or the latents as .npy with ``Accept: application/x-npy``."""
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            image = await self._image_input(request, size, crop)
        outcome = await self._run("encode", image)
        latents, clip = outcome.value.latents, outcome.value.clip_embedding
        latents = np.ascontiguousarray(latents, dtype="<f4")
        if NPY_MEDIA_TYPE in request.headers.get("accept", ""):
            buffer = io.BytesIO()
            np.save(buffer, latents, allow_pickle=False)
            return Response(buffer.getvalue(), media_type=NPY_MEDIA_TYPE, headers=_headers(outcome, timings))
        body = EncodeResponse(
            shape=list(latents.shape),
            latents=base64.b64encode(latents.tobytes()).decode("ascii"),
            clip_embedding=None if clip is None else clip.tolist(),
        )
        return JSONResponse(body.model_dump(), headers=_headers(outcome, timings))

    @app.post("/v1/decode", response_class=Response, responses={**_PNG, **_ERRORS}, openapi_extra=_LATENTS_BODY)
    async def decode(self, request: Request) -> Response:
        """Latents (the JSON ``/v1/encode`` returns, or a .npy file) -> image as PNG."""
        self._authorize(request)
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            body = await read_body(request, self._settings.max_body_bytes)
            latents = parse_latents(body, media_type(request))
            channels = (await self._info())["latent_channels"]
            latents = check_latents(latents, channels, self._settings.max_image_size)
        outcome = await self._run("decode", latents)
        with _timed(timings, "output"):
            png = await asyncio.to_thread(to_png_bytes, outcome.value)
        return Response(png, media_type="image/png", headers=_headers(outcome, timings))

    @app.post("/v1/embed", response_model=EmbedResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def embed(self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP) -> Response:
        """The normalized CLIP image embedding."""
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            image = await self._image_input(request, size, crop)
        if (await self._info())["embedding_dim"] is None:
            raise ApiError(501, "no_clip_head", "this model has no CLIP head (train_clip is false)")
        outcome = await self._run("embed", image)
        body = EmbedResponse(embedding=outcome.value.tolist(), dim=len(outcome.value))
        return JSONResponse(body.model_dump(), headers=_headers(outcome, timings))

    # ---------------------------------------------------------------------------------------- helpers

    def _authorize(self, request: Request) -> None:
        key = self._settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer", "Connection": "close"},  # its body is never read
            )

    async def _image_input(self, request: Request, size: int | None, crop: CropMode) -> np.ndarray:
        self._authorize(request)
        side = check_size(self._settings.image_size if size is None else size, self._settings.max_image_size)
        data = await read_image_upload(request, self._settings.max_body_bytes)
        return await asyncio.to_thread(preprocess_upload, data, side, crop, self._limits)

    async def _info(self) -> dict[str, Any]:
        # Every replica serves the same model, so any one's answer holds for all of them.
        if self._model_info is None:
            self._model_info = await self._call_model("info")
        return self._model_info

    async def _run(self, verb: Verb, array: np.ndarray) -> Outcome:
        return await self._call_model("run", verb, array)

    async def _call_model(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._model, method).remote(*args)
        except BackPressureError as e:
            raise ApiError(
                503,
                "overloaded",
                "the model replicas are at capacity (max_queued_requests); retry later",
                headers={"Retry-After": "1"},
            ) from e
        except RayTaskError as e:
            raise ApiError(500, "model", f"the model call failed: {e.cause}") from e
        except RayActorError as e:
            raise ApiError(
                503, "replica_died", "the model replica died during the request; retry", headers={"Retry-After": "1"}
            ) from e
