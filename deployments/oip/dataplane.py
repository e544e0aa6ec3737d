"""The KServe Open Inference Protocol (V2), transport-neutral: what its REST routes (``rest``) and gRPC RPCs
(``grpc_service``) both answer, as KServe's ``dataplane.py`` does.

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
from typing import Any, get_args

import numpy as np

from vtp_ray import __version__
from vtp_ray.arrays import as_image_batch
from vtp_ray.images import CropMode

from ..errors import ApiError, unsupported
from ..model.health import ModelStatus, readiness
from ..model.protocol import Outcome, Verb
from ..requests import check_latents, check_size, preprocess_upload
from ..settings import TextLimits
from ..state import IngressState
from ..texts import check_texts

VERSION = "1"
VERBS: tuple[str, ...] = get_args(Verb)
IMAGE, IMAGE_BYTES, LATENTS, CLIP_EMBEDDING, TEXT = "IMAGE", "IMAGE_BYTES", "LATENTS", "CLIP_EMBEDDING", "TEXT"
SERVER_METADATA = {"name": "vtp-ray", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


async def ready(state: IngressState) -> tuple[bool, str]:
    """Whether every served model has a replica that can answer, and why not (the reasons, joined)."""
    is_ready, body = readiness(await state.models.readiness.statuses())
    return is_ready, body.get("error", "")


async def index(state: IngressState) -> list[dict[str, Any]]:
    """Every OIP model: name, version, state (READY / UNAVAILABLE) and the reason when unavailable. A model whose
    checkpoint was never ready is listed with the verbs every checkpoint serves; ``embed`` and ``embed_text`` join
    once its info says it serves them."""
    statuses = await state.models.readiness.statuses()
    listed = []
    for name, status in statuses.items():
        info = await state.models.info(name) if status.ready else state.models.cached_info(name)
        readiness = "READY" if status.ready else "UNAVAILABLE"
        for verb in served_verbs(info):
            listed.append({"name": f"{name}.{verb}", "version": VERSION, "state": readiness, "reason": status.reason})
    return listed


def served_verbs(info: dict[str, Any] | None) -> list[str]:
    """The verbs a checkpoint serves (``info`` None: not known yet, the verbs every checkpoint has)."""
    return [verb for verb in VERBS if unsupported(verb, info) is None]


async def metadata(state: IngressState, oip_model: str, version: str) -> dict[str, Any]:
    """An OIP model's name, versions, platform, inputs and outputs."""
    model, verb = resolve(state, oip_model, version)
    info = await state.models.info(model)
    if (error := unsupported(verb, info)) is not None:
        raise error
    inputs, outputs = _signature(verb, info["latent_channels"], info["embedding_dim"])
    return {"name": oip_model, "versions": [VERSION], "platform": "vtp-ray", "inputs": inputs, "outputs": outputs}


async def model_status(state: IngressState, oip_model: str, version: str) -> ModelStatus:
    """Whether an OIP model's checkpoint has a replica that can answer (404 for an unknown model, 501 for a verb its
    checkpoint does not serve)."""
    model, verb = resolve(state, oip_model, version)
    info = state.models.cached_info(model)
    if info is not None and (error := unsupported(verb, info)) is not None:
        raise error
    return await state.models.readiness.status(model)


async def run_infer(
    state: IngressState, oip_model: str, version: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any]
) -> tuple[dict[str, np.ndarray], list[Outcome]]:
    """An infer request's inputs -> every output of the OIP model by name, and the model calls' outcomes. N images
    (or latents) are N entries of the model's batch queue, exactly like N HTTP requests."""
    model, verb = resolve(state, oip_model, version)
    info = await state.models.info(model)
    if (error := unsupported(verb, info)) is not None:
        raise error
    if verb == "embed_text":
        outcome = await state.models.call(model, "run", verb, _texts(inputs, state.config.text))
        return {CLIP_EMBEDDING: outcome.value}, [outcome]
    if verb == "decode":
        batch = _latents(inputs, info["latent_channels"], state)
    else:
        batch = await _images(inputs, parameters, state)
    outcomes = await state.models.call(model, "run_many", verb, batch)
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


def resolve(state: IngressState, oip_model: str, version: str) -> tuple[str, Verb]:
    """``<model>.<verb>`` and its version -> the served model and the verb; 404 for an unknown one."""
    model, _, verb = oip_model.rpartition(".")
    if verb not in VERBS or not model:
        raise ApiError(404, "unknown_model", f"no OIP model {oip_model!r}: names are <model>.<verb>, verbs {VERBS}")
    model = state.models.resolve(model)
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


async def _images(inputs: dict[str, np.ndarray], parameters: dict[str, Any], state: IngressState) -> list[np.ndarray]:
    name, tensor = _only(inputs, (IMAGE, IMAGE_BYTES))
    if name == IMAGE:
        try:
            batch = as_image_batch(tensor)
        except (TypeError, ValueError) as e:
            raise ApiError(400, "bad_infer_request", f"{IMAGE}: {e}") from e
        if max(batch.shape[1:3]) > state.config.limits.max_image_size:
            raise ApiError(
                413,
                "too_large",
                f"{IMAGE} of {batch.shape[1:3]} exceeds max_image_size {state.config.limits.max_image_size}",
            )
        return list(batch)
    if tensor.ndim != 1 or not len(tensor):
        raise ApiError(400, "bad_infer_request", f"{IMAGE_BYTES} must have shape [N], N >= 1, got {list(tensor.shape)}")
    size = parameters.get("size", state.settings.image_size)
    crop = parameters.get("crop", "center")
    if not isinstance(size, int) or crop not in get_args(CropMode):
        raise ApiError(
            400, "bad_infer_request", f"parameters: size must be an integer, crop one of {get_args(CropMode)}"
        )
    side = check_size(size, state.config.limits.max_image_size)
    limits = state.image_limits
    return list(await asyncio.gather(*(asyncio.to_thread(preprocess_upload, d, side, crop, limits) for d in tensor)))


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


def _latents(inputs: dict[str, np.ndarray], channels: int, state: IngressState) -> list[np.ndarray]:
    """The ``LATENTS`` input, checked with the same limits as ``/v1/decode`` (``check_latents``)."""
    _, tensor = _only(inputs, (LATENTS,))
    if tensor.dtype != np.float32:
        raise ApiError(400, "bad_infer_request", f"{LATENTS} must be FP32")
    if tensor.ndim != 4:
        raise ApiError(400, "bad_latents", f"{LATENTS} must have shape [N, {channels}, h, w], got {list(tensor.shape)}")
    return list(check_latents(tensor, channels, state.config.limits))
