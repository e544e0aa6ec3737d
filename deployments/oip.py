"""The KServe Open Inference Protocol (V2) over REST, as a router the ingress includes.

Every served checkpoint ``<model>`` offers one OIP model per verb, named ``<model>.<verb>`` (version ``1``):

| OIP model | inputs | outputs |
|---|---|---|
| ``<model>.encode`` | ``IMAGE`` UINT8 [-1, -1, -1, 3] or ``IMAGE_BYTES`` BYTES [-1] | ``LATENTS``, ``CLIP_EMBEDDING`` |
| ``<model>.reconstruct`` | the same | ``IMAGE`` UINT8 [-1, -1, -1, 3] |
| ``<model>.embed`` | the same | ``CLIP_EMBEDDING`` FP32 [-1, D] |
| ``<model>.decode`` | ``LATENTS`` FP32 [-1, C, -1, -1] | ``IMAGE`` UINT8 [-1, -1, -1, 3] |
| ``<model>.embed_text`` | ``TEXT`` BYTES [-1] (UTF-8) | ``CLIP_EMBEDDING`` FP32 [-1, D] |

with ``LATENTS`` FP32 [-1, C, -1, -1] and ``CLIP_EMBEDDING`` FP32 [-1, D]. A checkpoint without a CLIP head has no
``embed``, one without CLIP's text vocabulary no ``embed_text``: the index does not list them and they answer 501,
as their ``/v1`` routes do.

``IMAGE`` is the model input itself (sides multiples of 16, at most ``max_image_size``); ``IMAGE_BYTES`` holds
encoded image files, preprocessed as the HTTP API does (request parameters ``size`` and ``crop``). An infer request
of N images is N entries of the model's batch queue, exactly like N HTTP requests; the texts of one ``embed_text``
request are one entry (concurrent requests share a model call), exactly like ``/v1/embed-text``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from vtp_ray import __version__
from vtp_ray.arrays import as_image_batch
from vtp_ray.images import CropMode, ImageLimits

from .health import ModelStatus
from .inputs import ApiError, check_latents, check_size, preprocess_upload, read_body
from .models import ModelSet
from .oip_tensors import HEADER_LENGTH, encode_infer_response, parse_infer_request
from .protocol import Outcome, Verb
from .text_inputs import TextLimits, check_texts

VERSION = "1"
VERBS: tuple[str, ...] = get_args(Verb)
IMAGE, IMAGE_BYTES, LATENTS, CLIP_EMBEDDING, TEXT = "IMAGE", "IMAGE_BYTES", "LATENTS", "CLIP_EMBEDDING", "TEXT"
SERVER_METADATA = {"name": "vtp-ray", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


@dataclass(frozen=True)
class OipContext:
    """What the OIP routes need from the ingress that serves them."""

    models: ModelSet
    image_size: int
    max_image_size: int
    max_body_bytes: int
    limits: ImageLimits
    max_decode_batch: int
    max_decode_pixels: int
    text_limits: TextLimits
    authorize: Callable[[str | None], None]  # the Authorization header (or gRPC metadata) value


_context: OipContext | None = None


def attach(context: OipContext) -> None:
    """Called by the ingress when it starts: the router's functions are not its methods (Serve copies the app)."""
    global _context
    _context = context


def context() -> OipContext:
    """The serving ingress's context (503 while it starts)."""
    if _context is None:
        raise ApiError(503, "not_ready", "the ingress is starting")
    return _context


_CTX = Depends(context)


def _authorized(request: Request, ctx: OipContext = _CTX) -> OipContext:
    ctx.authorize(request.headers.get("authorization"))
    return ctx


_AUTH = Depends(_authorized)


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


@router.get("")
async def server_metadata(ctx: OipContext = _AUTH) -> dict[str, Any]:
    """Server metadata."""
    return SERVER_METADATA


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """Liveness: the HTTP path answers (never needs the API key)."""
    return {"live": True}


@router.get("/health/ready")
async def server_ready(ctx: OipContext = _CTX) -> JSONResponse:
    """Readiness: every served model has a replica that can answer; else 503 with the reasons."""
    reasons = await not_ready_reasons(ctx)
    if reasons:
        return JSONResponse({"ready": False, "error": "; ".join(reasons)}, status_code=503)
    return JSONResponse({"ready": True})


async def not_ready_reasons(ctx: OipContext) -> list[str]:
    """Why the server is not ready: one reason per served model without a replica that can answer."""
    statuses = await ctx.models.readiness.statuses()
    return [s.reason for s in statuses.values() if not s.ready]


@router.get("/models")
async def model_list(ctx: OipContext = _AUTH) -> dict[str, Any]:
    """Every OIP model (``<model>.<verb>``) with its readiness (an extension: not in the protocol)."""
    return {"models": await index(ctx)}


@router.post("/repository/index")
async def repository_index(ctx: OipContext = _AUTH) -> list[dict[str, Any]]:
    """The model repository extension's index: every OIP model, version and state (READY / UNAVAILABLE)."""
    return await index(ctx)


async def index(ctx: OipContext) -> list[dict[str, Any]]:
    """Every OIP model: name, version, state (READY / UNAVAILABLE) and the reason when unavailable. A model whose
    checkpoint was never ready is listed with the verbs every checkpoint serves; ``embed`` and ``embed_text`` join
    once its info says it serves them."""
    statuses = await ctx.models.readiness.statuses()
    listed = []
    for name, status in statuses.items():
        info = await ctx.models.info(name) if status.ready else ctx.models.cached_info(name)
        for verb in served_verbs(info):
            state = "READY" if status.ready else "UNAVAILABLE"
            listed.append({"name": f"{name}.{verb}", "version": VERSION, "state": state, "reason": status.reason})
    return listed


def served_verbs(info: dict[str, Any] | None) -> list[str]:
    """The verbs a checkpoint serves (``info`` None: not known yet, the verbs every checkpoint has)."""
    return [verb for verb in VERBS if unsupported(verb, info) is None]


def unsupported(verb: str, info: dict[str, Any] | None) -> ApiError | None:
    """The 501 of a verb this checkpoint cannot serve, else None (``info`` None: only the image verbs are known)."""
    if verb not in ("embed", "embed_text", "classify"):
        return None
    if info is None:
        return ApiError(503, "not_ready", "the model's checkpoint is not known yet")
    if info["embedding_dim"] is None:
        return ApiError(501, "no_clip_head", "this model has no CLIP head (train_clip is false)")
    if verb != "embed" and info.get("text_context_length") is None:
        return ApiError(501, "no_text_vocabulary", "this model's text tower does not use CLIP's BPE vocabulary")
    return None


@router.get("/models/{oip_model}")
@router.get("/models/{oip_model}/versions/{version}")
async def model_metadata(oip_model: str, version: str = VERSION, ctx: OipContext = _AUTH) -> Any:
    """Model metadata: its inputs and outputs, -1 for variable dimensions."""
    return await metadata(ctx, oip_model, version)


async def metadata(ctx: OipContext, oip_model: str, version: str) -> dict[str, Any]:
    """An OIP model's name, versions, platform, inputs and outputs."""
    model, verb = _split(ctx, oip_model, version)
    info = await ctx.models.info(model)
    if (error := unsupported(verb, info)) is not None:
        raise error
    inputs, outputs = _signature(verb, info["latent_channels"], info["embedding_dim"])
    return {"name": oip_model, "versions": [VERSION], "platform": "vtp-ray", "inputs": inputs, "outputs": outputs}


async def model_status(ctx: OipContext, oip_model: str, version: str) -> ModelStatus:
    """Whether an OIP model's checkpoint has a replica that can answer (404 for an unknown model, 501 for a verb its
    checkpoint does not serve)."""
    model, verb = _split(ctx, oip_model, version)
    info = ctx.models.cached_info(model)
    if info is not None and (error := unsupported(verb, info)) is not None:
        raise error
    return await ctx.models.readiness.status(model)


@router.get("/models/{oip_model}/ready")
@router.get("/models/{oip_model}/versions/{version}/ready")
async def model_ready(oip_model: str, version: str = VERSION, ctx: OipContext = _AUTH) -> JSONResponse:
    """200 when the model has a replica that can answer; else 503 with the reason."""
    status = await model_status(ctx, oip_model, version)
    if not status.ready:
        return JSONResponse({"name": oip_model, "ready": False, "error": status.reason}, status_code=503)
    return JSONResponse({"name": oip_model, "ready": True})


@router.post("/models/{oip_model}/infer")
@router.post("/models/{oip_model}/versions/{version}/infer")
async def infer(oip_model: str, request: Request, version: str = VERSION, ctx: OipContext = _AUTH) -> Response:
    """Inference; JSON tensors and the binary tensor data extension (any Content-Type: tritonclient sends none)."""
    _split(ctx, oip_model, version)  # 404 before reading the body
    body = await read_body(request, ctx.max_body_bytes)
    # off the event loop: 16 MiB of JSON numbers take ~0.5 s to parse here
    parsed = await asyncio.to_thread(parse_infer_request, body, request.headers.get(HEADER_LENGTH))
    outputs, outcomes = await run_infer(ctx, oip_model, version, parsed.inputs, parsed.header.parameters)
    content, headers, media = encode_infer_response(oip_model, VERSION, parsed.header, outputs)
    headers["x-vtp-batch-size"] = batch_sizes(outcomes)
    return Response(content, media_type=media, headers=headers)


async def run_infer(
    ctx: OipContext, oip_model: str, version: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any]
) -> tuple[dict[str, np.ndarray], list[Outcome]]:
    """An infer request's inputs -> every output of the OIP model by name, and the model calls' outcomes. N images
    (or latents) are N entries of the model's batch queue, exactly like N HTTP requests."""
    model, verb = _split(ctx, oip_model, version)
    info = await ctx.models.info(model)
    if (error := unsupported(verb, info)) is not None:
        raise error
    if verb == "embed_text":
        outcome = await ctx.models.call(model, "run", verb, _texts(inputs, ctx.text_limits))
        return {CLIP_EMBEDDING: outcome.value}, [outcome]
    if verb == "decode":
        batch = _latents(inputs, info["latent_channels"], ctx)
    else:
        batch = await _images(inputs, parameters, ctx)
    outcomes = await ctx.models.call(model, "run_many", verb, batch)
    values = [o.value for o in outcomes]
    if verb == "encode":
        outputs = {LATENTS: np.stack([v.latents for v in values])}
        if info["embedding_dim"] is not None:
            outputs[CLIP_EMBEDDING] = np.stack([v.clip_embedding for v in values])
    elif verb == "embed":
        outputs = {CLIP_EMBEDDING: np.stack(values)}
    else:
        outputs = {IMAGE: np.stack(values)}
    return outputs, outcomes


def batch_sizes(outcomes: list[Outcome]) -> str:
    """``x-vtp-batch-size`` of an infer request: the size of the model call each of its inputs went in."""
    return ",".join(str(o.batch_size) for o in outcomes)


def _split(ctx: OipContext, oip_model: str, version: str) -> tuple[str, Verb]:
    model, _, verb = oip_model.rpartition(".")
    if verb not in VERBS or not model:
        raise ApiError(404, "unknown_model", f"no OIP model {oip_model!r}: names are <model>.<verb>, verbs {VERBS}")
    model = ctx.models.resolve(model)
    if version not in ("", VERSION):  # "": the latest (gRPC's unset field)
        raise ApiError(404, "unknown_model", f"model {oip_model!r} has only version {VERSION}, not {version!r}")
    return model, verb  # type: ignore[return-value]


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def _signature(verb: str, channels: int, dim: int | None) -> tuple[list[dict], list[dict]]:
    image = _tensor(IMAGE, "UINT8", [-1, -1, -1, 3])
    latents = _tensor(LATENTS, "FP32", [-1, channels, -1, -1])
    clip = [_tensor(CLIP_EMBEDDING, "FP32", [-1, dim])] if dim is not None else []
    if verb == "decode":
        return [latents], [image]
    if verb == "embed_text":
        return [_tensor(TEXT, "BYTES", [-1])], clip
    inputs = [image, _tensor(IMAGE_BYTES, "BYTES", [-1])]  # one of the two
    outputs = {"encode": [latents, *clip], "embed": clip, "reconstruct": [image]}[verb]
    return inputs, outputs


def _only(inputs: dict[str, np.ndarray], allowed: tuple[str, ...]) -> tuple[str, np.ndarray]:
    names = [n for n in inputs if n in allowed]
    extra = sorted(set(inputs) - set(allowed))
    if len(names) != 1 or extra:
        raise ApiError(400, "bad_infer_request", f"send exactly one input of {list(allowed)}, got {sorted(inputs)}")
    return names[0], inputs[names[0]]


async def _images(inputs: dict[str, np.ndarray], parameters: dict[str, Any], ctx: OipContext) -> list[np.ndarray]:
    name, tensor = _only(inputs, (IMAGE, IMAGE_BYTES))
    if name == IMAGE:
        try:
            batch = as_image_batch(tensor)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "bad_infer_request", f"{IMAGE}: {e}") from e
        if max(batch.shape[1:3]) > ctx.max_image_size:
            raise ApiError(
                413, "too_large", f"{IMAGE} of {batch.shape[1:3]} exceeds max_image_size {ctx.max_image_size}"
            )
        return list(batch)
    if tensor.ndim != 1 or not len(tensor):
        raise ApiError(400, "bad_infer_request", f"{IMAGE_BYTES} must have shape [N], N >= 1, got {list(tensor.shape)}")
    size = parameters.get("size", ctx.image_size)
    crop = parameters.get("crop", "center")
    if not isinstance(size, int) or crop not in get_args(CropMode):
        raise ApiError(
            400, "bad_infer_request", f"parameters: size must be an integer, crop one of {get_args(CropMode)}"
        )
    side = check_size(size, ctx.max_image_size)
    return list(
        await asyncio.gather(*(asyncio.to_thread(preprocess_upload, data, side, crop, ctx.limits) for data in tensor))
    )


def _texts(inputs: dict[str, np.ndarray], limits: TextLimits) -> tuple[str, ...]:
    """The ``TEXT`` input: UTF-8 strings, checked with the same limits as ``/v1/embed-text``."""
    _, tensor = _only(inputs, (TEXT,))
    if tensor.dtype != object or tensor.ndim != 1:
        raise ApiError(400, "bad_infer_request", f"{TEXT} must be BYTES of shape [N], got {list(tensor.shape)}")
    try:
        texts = [bytes(value).decode("utf-8") for value in tensor]
    except UnicodeDecodeError as e:
        raise ApiError(400, "bad_infer_request", f"{TEXT}: not UTF-8 ({e})") from e
    return check_texts(texts, limits)


def _latents(inputs: dict[str, np.ndarray], channels: int, ctx: OipContext) -> list[np.ndarray]:
    """The ``LATENTS`` input, checked with the same limits as ``/v1/decode`` (``check_latents``)."""
    _, tensor = _only(inputs, (LATENTS,))
    if tensor.dtype != np.float32:
        raise ApiError(400, "bad_infer_request", f"{LATENTS} must be FP32")
    if tensor.ndim != 4:
        raise ApiError(400, "bad_latents", f"{LATENTS} must have shape [N, {channels}, h, w], got {list(tensor.shape)}")
    return list(check_latents(tensor, channels, ctx.max_image_size, ctx.max_decode_batch, ctx.max_decode_pixels))
