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
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from vtp_ray import __version__
from vtp_ray.images import CropMode, ImageLimits, to_png_bytes

from . import metrics, oip, page
from .inputs import (
    NPY_MEDIA_TYPE,
    ApiError,
    check_latents,
    check_size,
    describe_errors,
    media_type,
    parse_latents,
    preprocess_upload,
    read_body,
    read_image_and_fields,
    read_image_upload,
)
from .models import ModelSelection, ModelSet
from .oip_grpc import InferenceService
from .protocol import ClassScores, Outcome, Verb
from .schemas import (
    ClassifyResponse,
    EmbedResponse,
    EmbedTextRequest,
    EmbedTextResponse,
    EncodeResponse,
    ErrorResponse,
    Health,
    LabelScore,
    LatentsPayload,
    Limits,
    ModelInfo,
)
from .text_inputs import TextLimits, classify_options, parse_embed_text
from .uploads import UploadGuard, UploadPolicy

BATCH_SIZE_HEADER = "x-vtp-batch-size"
LABEL_CACHE_HEADER = "x-vtp-label-cache"  # hit: the label set's text embeddings were cached on the replica


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress enforces; see ``AppArgs`` for the meaning of each field."""

    image_size: int
    max_image_size: int
    max_body_bytes: int
    max_pixels: int
    api_key: str | None = None
    default_model: str = "vtp"
    model_wait_s: float = 10.0
    max_decode_batch: int = 64
    max_decode_pixels: int = 16_777_216
    text_limits: TextLimits = field(default_factory=TextLimits)
    draft_decode: bool = False
    uploads: UploadPolicy | None = None  # body deadline and per-client upload cap (uploads.py)


app = FastAPI(
    title="VTP visual tokenizer",
    version=__version__,
    description="Image in; reconstruction, latents or CLIP embedding out. Errors are JSON {'error': ...}.",
)
app.include_router(page.router)

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
_TEXT_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": EmbedTextRequest.model_json_schema()}}}
}
_TEXT_FIELDS = {
    "labels": {"type": "array", "items": {"type": "string"}, "description": "repeated field, or one JSON array"},
    "templates": {"type": "array", "items": {"type": "string"}, "description": "with {} for the label"},
    "template_set": {"type": "string", "enum": ["default", "imagenet"]},
}
_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _BINARY["schema"], **_TEXT_FIELDS},
                    "required": ["image", "labels"],
                }
            },
        },
    }
}
_LABELS = Query(None, description="the labels (repeat the parameter), or one JSON array; or as form fields")
_TEMPLATES = Query(None, description="prompt templates with {} (repeat); default: 'a photo of a {}.'")
_TEMPLATE_SET = Query(None, description="a named template set instead: default, or imagenet (OpenAI's 80)")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503)
}
app.add_middleware(ModelSelection)  # ?model= / x-vtp-model pick the model of a /v1 request
app.include_router(oip.router)

_PNG = {200: {"content": {"image/png": {}}, "description": "the image as PNG"}}
ZIP = "application/zip"
MULTIPART = "multipart/mixed"
_DECODED = {
    200: {
        "content": {"image/png": {}, NPY_MEDIA_TYPE: {}, ZIP: {}, MULTIPART: {}},
        "description": "one image as PNG; a batch as .npy uint8 (N, H, W, 3), or a zip / multipart of PNGs",
    }
}
_SIZE = Query(None, description="side of the square model input (multiple of 16); default: image_size")
_CROP = Query("center", description="center: ADM center crop (as in training); resize: squash to a square")
DecodeMode = Literal["exact", "fast"]
_DECODE = Query(
    None,
    description="exact: decode JPEGs at full size; fast: at a reduced scale where the crop allows (Pillow's draft "
    "mode; pixels differ slightly); default: the draft_decode setting",
)


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
    summary = describe_errors(errors)
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


def _slowest(outcomes: list[Outcome]) -> Outcome:
    """What a many-input request reports: its largest model call and its longest queue and model times."""
    return Outcome(
        None,
        max(o.batch_size for o in outcomes),
        max(o.queue_ms for o in outcomes),
        max(o.model_ms for o in outcomes),
    )


def encode_images(images: list[np.ndarray], kind: str) -> tuple[bytes, str]:
    """uint8 ``(H, W, 3)`` images -> ``(body, media type)``: one .npy, a zip or a multipart/mixed of PNGs named
    ``00000.png``... in input order. CPU work: call it off the event loop."""
    if kind == NPY_MEDIA_TYPE:
        buffer = io.BytesIO()
        np.save(buffer, np.stack(images), allow_pickle=False)
        return buffer.getvalue(), NPY_MEDIA_TYPE
    pngs = [(f"{i:05d}.png", to_png_bytes(image)) for i, image in enumerate(images)]
    if kind == ZIP:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for name, png in pngs:
                archive.writestr(name, png)
        return buffer.getvalue(), ZIP
    boundary = uuid.uuid4().hex
    head = '--{}\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename="{}"\r\n\r\n'
    parts = [head.format(boundary, name).encode() + png + b"\r\n" for name, png in pngs]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"{MULTIPART}; boundary={boundary}"


def _headers(outcome: Outcome, timings: dict[str, float]) -> dict[str, str]:
    """``x-vtp-batch-size``, and a ``Server-Timing`` header saying where the request's time went (ms)."""
    stages = {**timings, "queue": outcome.queue_ms, "model": outcome.model_ms}
    if "call" in stages:  # the handle round trip, less the replica's own time: serialization and Serve's hops
        stages["hop"] = max(stages.pop("call") - outcome.queue_ms - outcome.model_ms, 0.0)
    ordered = (name for name in ("read", "decode", "input", "hop", "queue", "model", "output") if name in stages)
    return {
        BATCH_SIZE_HEADER: str(outcome.batch_size),
        "server-timing": ", ".join(f"{name};dur={stages[name]:.1f}" for name in ordered),
    }


# A request holds an ingress slot while its body arrives (up to body_timeout_s): slots are cheap (no model work,
# which the model deployment's own queue bounds), so there are many, and max_uploads_per_client caps one client's.
@serve.deployment(name="VTPIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class VTPIngress(InferenceService):
    """HTTP API in front of the ``VTPReplica`` deployment, and the OIP's gRPC service (``InferenceService``) when
    Serve's gRPC proxy is configured for it."""

    def __init__(self, models: dict[str, DeploymentHandle], settings: IngressSettings) -> None:
        app_name = serve.get_replica_context().app_name
        self._models = ModelSet(models, settings.default_model, app_name, settings.model_wait_s)
        self._settings = settings
        self._limits = ImageLimits(max_bytes=settings.max_body_bytes, max_pixels=settings.max_pixels)
        oip.attach(
            oip.OipContext(
                self._models,
                settings.image_size,
                settings.max_image_size,
                settings.max_body_bytes,
                self._limits,
                settings.max_decode_batch,
                settings.max_decode_pixels,
                settings.text_limits,
                self._check_key,
            )
        )
        app.state.uploads = settings.uploads  # read by the UploadGuard middleware

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness of the HTTP path; never needs the API key."""
        return Health()

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 when every model has a replica that can answer, else 503 with the reasons."""
        statuses = await self._models.readiness.statuses()
        models = {name: status.to_dict() for name, status in statuses.items()}
        reasons = [status.reason for status in statuses.values() if not status.ready]
        if reasons:
            return JSONResponse({"status": "not_ready", "error": "; ".join(reasons), "models": models}, 503)
        return JSONResponse({"status": "ready", "models": models})

    @app.get("/v1/models", responses=_ERRORS)
    async def models(self, request: Request) -> JSONResponse:
        """The served models by name (``?model=`` / ``x-vtp-model`` values), the default, and their readiness."""
        self._authorize(request)
        statuses = await self._models.readiness.statuses()
        return JSONResponse(
            {"default": self._models.default, "models": {name: s.to_dict() for name, s in statuses.items()}}
        )

    @app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model(self, request: Request) -> ModelInfo:
        """The model, device, precision and batch settings of the replica that answers."""
        self._authorize(request)
        name = self._models.resolve()
        info = await self._models.call(name, "info")  # fresh: says which replica answered
        s = self._settings
        limits = Limits(
            image_size=s.image_size,
            max_image_size=s.max_image_size,
            max_body_bytes=s.max_body_bytes,
            max_pixels=s.max_pixels,
            api_key_required=s.api_key is not None,
        )
        return ModelInfo(**info, limits=limits, name=name, models=self._models.names)

    @app.post("/v1/reconstruct", response_class=Response, responses={**_PNG, **_ERRORS}, openapi_extra=_IMAGE_BODY)
    async def reconstruct(
        self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP, decode: DecodeMode | None = _DECODE
    ) -> Response:
        """Encode and decode the preprocessed image; returns the reconstruction as PNG."""
        timings: dict[str, float] = {}
        image = await self._image_input(request, size, crop, decode, timings)
        outcome = await self._run("reconstruct", image, timings)
        with _timed(timings, "output"):
            png = await asyncio.to_thread(to_png_bytes, outcome.value)
        return Response(png, media_type="image/png", headers=_headers(outcome, timings))

    @app.post(
        "/v1/encode",
        response_model=EncodeResponse,
        responses={200: {"content": {NPY_MEDIA_TYPE: {}}}, **_ERRORS},
        openapi_extra=_IMAGE_BODY,
    )
    async def encode(
        self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP, decode: DecodeMode | None = _DECODE
    ) -> Response:
        """Latents (C, h, w) and CLIP embedding as JSON, or the latents as .npy with ``Accept: application/x-npy``."""
        timings: dict[str, float] = {}
        image = await self._image_input(request, size, crop, decode, timings)
        outcome = await self._run("encode", image, timings)
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

    @app.post("/v1/decode", response_class=Response, responses={**_DECODED, **_ERRORS}, openapi_extra=_LATENTS_BODY)
    async def decode(self, request: Request) -> Response:
        """Latents (the JSON ``/v1/encode`` returns, or a .npy file), one ``(C, h, w)`` or a batch ``(N, C, h, w)``
        -> the images: PNG for one; by ``Accept``, an .npy of uint8 ``(N, H, W, 3)`` (the default for a batch), a
        zip or a ``multipart/mixed`` of PNGs. Each latent is one entry of the replica's batch queue."""
        self._authorize(request)
        s = self._settings
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            body = await read_body(request, s.max_body_bytes)
            latents = parse_latents(body, media_type(request))
            channels = (await self._info())["latent_channels"]
            latents = check_latents(latents, channels, s.max_image_size, s.max_decode_batch, s.max_decode_pixels)
        accept = request.headers.get("accept", "")
        kind = next(
            (k for k in (NPY_MEDIA_TYPE, ZIP, MULTIPART) if k in accept),
            "image/png" if len(latents) == 1 else NPY_MEDIA_TYPE,
        )
        if len(latents) == 1 and kind == "image/png":
            outcome = await self._run("decode", latents[0], timings)
            with _timed(timings, "output"):
                png = await asyncio.to_thread(to_png_bytes, outcome.value)
            return Response(png, media_type="image/png", headers=_headers(outcome, timings))
        outcomes = await self._call_model("run_many", "decode", latents)
        with _timed(timings, "output"):
            content, media = await asyncio.to_thread(encode_images, [o.value for o in outcomes], kind)
        return Response(content, media_type=media, headers=_headers(_slowest(outcomes), timings))

    @app.post("/v1/embed", response_model=EmbedResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def embed(
        self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP, decode: DecodeMode | None = _DECODE
    ) -> Response:
        """The normalized CLIP image embedding."""
        timings: dict[str, float] = {}
        image = await self._image_input(request, size, crop, decode, timings)
        if (await self._info())["embedding_dim"] is None:
            raise ApiError(501, "no_clip_head", "this model has no CLIP head (train_clip is false)")
        outcome = await self._run("embed", image, timings)
        body = EmbedResponse(embedding=outcome.value.tolist(), dim=len(outcome.value))
        return JSONResponse(body.model_dump(), headers=_headers(outcome, timings))

    @app.post("/v1/embed-text", response_model=EmbedTextResponse, responses=_ERRORS, openapi_extra=_TEXT_BODY)
    async def embed_text(self, request: Request) -> Response:
        """Normalized CLIP text embeddings of ``{"texts": [...]}``; concurrent requests share one model call."""
        self._authorize(request)
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            body = await read_body(request, self._settings.max_body_bytes)
            texts = parse_embed_text(body, self._settings.text_limits)
            await self._require_clip()
        outcome = await self._run("embed_text", texts, timings)
        body = EmbedTextResponse(embeddings=outcome.value.tolist(), dim=outcome.value.shape[1])
        return JSONResponse(body.model_dump(), headers=_headers(outcome, timings))

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_CLASSIFY_BODY)
    async def classify(
        self,
        request: Request,
        size: int | None = _SIZE,
        crop: CropMode = _CROP,
        labels: list[str] | None = _LABELS,
        templates: list[str] | None = _TEMPLATES,
        template_set: str | None = _TEMPLATE_SET,
    ) -> Response:
        """Zero-shot classification of an image (raw body or multipart) against labels: most probable first."""
        self._authorize(request)
        timings: dict[str, float] = {}
        with _timed(timings, "input"):
            side = check_size(self._settings.image_size if size is None else size, self._settings.max_image_size)
            limits = self._settings.text_limits
            max_fields = limits.max_labels + limits.max_templates + 8
            data, fields = await read_image_and_fields(request, self._settings.max_body_bytes, max_fields)
            query = {"labels": labels or [], "templates": templates or [], "template_set": [template_set or ""]}
            for name, values in query.items():
                fields.setdefault(name, []).extend(v for v in values if v)
            label_set, prompts = classify_options(fields, limits)
            await self._require_clip()
            image = await asyncio.to_thread(preprocess_upload, data, side, crop, self._limits)
        outcome = await self._call_model("classify", image, label_set, prompts)
        scores: ClassScores = outcome.value
        order = np.argsort(-scores.logits, kind="stable")
        body = ClassifyResponse(
            labels=[
                LabelScore(
                    label=label_set[i], probability=float(scores.probabilities[i]), logit=float(scores.logits[i])
                )
                for i in order
            ],
            activation=scores.activation,
            templates=scores.templates,
        )
        headers = {**_headers(outcome, timings), LABEL_CACHE_HEADER: "hit" if scores.cache_hit else "miss"}
        return JSONResponse(body.model_dump(), headers=headers)

    @app.post("/v1/preprocess", response_class=Response, responses={**_PNG, **_ERRORS}, openapi_extra=_IMAGE_BODY)
    async def preprocess(
        self, request: Request, size: int | None = _SIZE, crop: CropMode = _CROP, decode: DecodeMode | None = _DECODE
    ) -> Response:
        """The model input the other endpoints would make of this image (decoded and cropped), as PNG.

        No model call: it shows what the model sees, and is what a reconstruction is compared with (PSNR).
        """
        timings: dict[str, float] = {}
        image = await self._image_input(request, size, crop, decode, timings)
        with _timed(timings, "output"):
            png = await asyncio.to_thread(to_png_bytes, image)
        stages = ", ".join(f"{name};dur={ms:.1f}" for name, ms in timings.items())
        return Response(png, media_type="image/png", headers={"server-timing": stages})

    # ---------------------------------------------------------------------------------------- helpers

    async def _require_clip(self) -> None:
        info = await self._info()
        if info["embedding_dim"] is None:
            raise ApiError(501, "no_clip_head", "this model has no CLIP head and text tower (train_clip is false)")
        if info.get("text_context_length") is None:
            raise ApiError(501, "no_text_vocabulary", "this model's text tower does not use CLIP's BPE vocabulary")

    def _authorize(self, request: Request) -> None:
        self._check_key(request.headers.get("authorization"))

    def _check_key(self, authorization: str | None) -> None:
        """401 unless the API key is unset or ``authorization`` is ``Bearer <key>``."""
        key = self._settings.api_key
        if key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer", "Connection": "close"},  # its body is never read
            )

    async def _image_input(
        self,
        request: Request,
        size: int | None,
        crop: CropMode,
        decode: DecodeMode | None,
        timings: dict[str, float],
    ) -> np.ndarray:
        """Authorize, read the upload (``read`` in Server-Timing), decode and crop it (``decode``)."""
        self._authorize(request)
        side = check_size(self._settings.image_size if size is None else size, self._settings.max_image_size)
        draft = self._settings.draft_decode if decode is None else decode == "fast"
        with _timed(timings, "read"):
            data = await read_image_upload(request, self._settings.max_body_bytes)
        with _timed(timings, "decode"):
            return await asyncio.to_thread(preprocess_upload, data, side, crop, self._limits, draft)

    async def _info(self) -> dict[str, Any]:
        return await self._models.info(self._models.resolve())

    async def _run(
        self, verb: Verb, array: np.ndarray | tuple[str, ...], timings: dict[str, float] | None = None
    ) -> Outcome:
        if timings is None:
            return await self._call_model("run", verb, array)
        with _timed(timings, "call"):  # less the replica's time: the "hop" in Server-Timing
            return await self._call_model("run", verb, array)

    async def _call_model(self, method: str, *args: Any) -> Any:
        return await self._models.call(self._models.resolve(), method, *args)
