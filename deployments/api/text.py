"""``/v1``'s CLIP text routes: text embeddings, and zero-shot classification of an image against labels."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vtp_ray.images import CropMode

from ..model.protocol import ClassScores
from ..requests import preprocess_upload, read_body, read_image_and_fields
from ..texts import classify_options
from . import openapi
from .bodies import parse_embed_text
from .calls import MODEL_CALL, Call
from .responses import LABEL_CACHE_HEADER, served_headers, timed
from .schemas import ClassifyResponse, EmbedTextResponse, LabelScore

router = APIRouter(prefix="/v1")


@router.post("/embed-text", response_model=EmbedTextResponse, responses=openapi.ERRORS, openapi_extra=openapi.TEXT_BODY)
async def embed_text(request: Request, call: Call = MODEL_CALL) -> Response:
    """Normalized CLIP text embeddings of ``{"texts": [...]}``; concurrent requests share one model call."""
    config = call.state.config
    with timed(call.timings, "input"):
        body = await read_body(request, config.limits.max_body_bytes)
        texts = parse_embed_text(body, config.text)
        await call.require("embed_text")
    outcome = await call.run("embed_text", texts)
    body = EmbedTextResponse(embeddings=outcome.value.tolist(), dim=outcome.value.shape[1])
    return JSONResponse(body.model_dump(), headers=served_headers(outcome, call.timings))


@router.post(
    "/classify", response_model=ClassifyResponse, responses=openapi.ERRORS, openapi_extra=openapi.CLASSIFY_BODY
)
async def classify(
    request: Request,
    size: int | None = openapi.SIZE,
    crop: CropMode = openapi.CROP,
    labels: list[str] | None = openapi.LABELS,
    templates: list[str] | None = openapi.TEMPLATES,
    template_set: str | None = openapi.TEMPLATE_SET,
    call: Call = MODEL_CALL,
) -> Response:
    """Zero-shot classification of an image (raw body or multipart) against labels: most probable first."""
    config = call.state.config
    with timed(call.timings, "input"):
        side = call.side(size)
        max_fields = config.text.max_labels + config.text.max_templates + 8
        data, fields = await read_image_and_fields(request, config.limits.max_body_bytes, max_fields)
        query = {"labels": labels or [], "templates": templates or [], "template_set": [template_set or ""]}
        for name, values in query.items():
            fields.setdefault(name, []).extend(v for v in values if v)
        label_set, prompts = classify_options(fields, config.text)
        await call.require("classify")
        image = await asyncio.to_thread(preprocess_upload, data, side, crop, call.state.image_limits)
    outcome = await call.call("classify", image, label_set, prompts)
    scores: ClassScores = outcome.value
    order = np.argsort(-scores.logits, kind="stable")
    body = ClassifyResponse(
        labels=[
            LabelScore(label=label_set[i], probability=float(scores.probabilities[i]), logit=float(scores.logits[i]))
            for i in order
        ],
        activation=scores.activation,
        templates=scores.templates,
    )
    headers = {**served_headers(outcome, call.timings), LABEL_CACHE_HEADER: "hit" if scores.cache_hit else "miss"}
    return JSONResponse(body.model_dump(), headers=headers)
