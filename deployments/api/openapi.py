"""What the OpenAPI page (``/docs``) shows of ``/v1``'s request bodies, answers and query parameters, which FastAPI
cannot infer from routes that read their bodies as streams."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Query

from .responses import MULTIPART, NPY_MEDIA_TYPE, ZIP
from .schemas import EmbedTextRequest, ErrorResponse, LatentsPayload

_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODY = {
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
LATENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": LatentsPayload.model_json_schema()}, NPY_MEDIA_TYPE: _BINARY},
    }
}
TEXT_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": EmbedTextRequest.model_json_schema()}}}
}
_TEXT_FIELDS = {
    "labels": {"type": "array", "items": {"type": "string"}, "description": "repeated field, or one JSON array"},
    "templates": {"type": "array", "items": {"type": "string"}, "description": "with {} for the label"},
    "template_set": {"type": "string", "enum": ["default", "imagenet"]},
}
CLASSIFY_BODY = {
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
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503)
}
PNG = {200: {"content": {"image/png": {}}, "description": "the image as PNG"}}
DECODED = {
    200: {
        "content": {"image/png": {}, NPY_MEDIA_TYPE: {}, ZIP: {}, MULTIPART: {}},
        "description": "one image as PNG; a batch as .npy uint8 (N, H, W, 3), or a zip / multipart of PNGs",
    }
}

SIZE = Query(None, description="side of the square model input (multiple of 16); default: image_size")
CROP = Query("center", description="center: ADM center crop (as in training); resize: squash to a square")
PreprocessMode = Literal["exact", "fast"]
PREPROCESS = Query(
    None,
    description="exact: load JPEGs at full size; fast: at a reduced scale where the crop allows (Pillow's draft "
    "mode; pixels differ slightly); default: the preprocess.fast setting",
)
DECODE = Query(None, deprecated=True, description="the former name of `preprocess`")
MODEL = Query(None, description="the served model to use (GET /v1/models); default: the default model")
LABELS = Query(None, description="the labels (repeat the parameter), or one JSON array; or as form fields")
TEMPLATES = Query(None, description="prompt templates with {} (repeat); default: 'a photo of a {}.'")
TEMPLATE_SET = Query(None, description="a named template set instead: default, or imagenet (OpenAI's 80)")
