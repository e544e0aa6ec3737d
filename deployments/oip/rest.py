"""The Open Inference Protocol over REST (``/v2``): a thin adapter from HTTP to ``dataplane``.

Tensors travel as JSON ``data`` or with the binary tensor data extension (``tensors``); the infer route takes any
Content-Type, since tritonclient sends none. Every route but liveness and readiness needs the API key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..requests import read_body
from ..state import IngressState, ingress_state
from . import dataplane
from .tensors import HEADER_LENGTH, encode_infer_response, parse_infer_request

__all__ = ["attach_router", "router"]

_STATE = Depends(ingress_state)


async def _authorized(request: Request, state: IngressState = _STATE) -> IngressState:
    state.authorize(state.http_caller(request.scope))
    return state


_AUTH = Depends(_authorized)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


@router.get("")
async def server_metadata(state: IngressState = _AUTH) -> dict[str, Any]:
    """Server metadata."""
    return dataplane.SERVER_METADATA


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """Liveness: the HTTP path answers (never needs the API key)."""
    return {"live": True}


@router.get("/health/ready")
async def server_ready(state: IngressState = _STATE) -> JSONResponse:
    """Readiness: every served model has a replica that can answer; else 503 with the reasons."""
    ready, reasons = await dataplane.ready(state)
    if not ready:
        return JSONResponse({"ready": False, "error": reasons}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models")
async def model_list(state: IngressState = _AUTH) -> dict[str, Any]:
    """Every OIP model (``<model>.<verb>``) with its readiness (an extension: not in the protocol)."""
    return {"models": await dataplane.index(state)}


@router.post("/repository/index")
async def repository_index(state: IngressState = _AUTH) -> list[dict[str, Any]]:
    """The model repository extension's index: every OIP model, version and state (READY / UNAVAILABLE)."""
    return await dataplane.index(state)


@router.get("/models/{oip_model}")
@router.get("/models/{oip_model}/versions/{version}")
async def model_metadata(oip_model: str, version: str = dataplane.VERSION, state: IngressState = _AUTH) -> Any:
    """Model metadata: its inputs and outputs, -1 for variable dimensions."""
    return await dataplane.metadata(state, oip_model, version)


@router.get("/models/{oip_model}/ready")
@router.get("/models/{oip_model}/versions/{version}/ready")
async def model_ready(oip_model: str, version: str = dataplane.VERSION, state: IngressState = _AUTH) -> JSONResponse:
    """200 when the model has a replica that can answer; else 503 with the reason."""
    status = await dataplane.model_status(state, oip_model, version)
    if not status.ready:
        return JSONResponse({"name": oip_model, "ready": False, "error": status.reason}, status_code=503)
    return JSONResponse({"name": oip_model, "ready": True})


@router.post("/models/{oip_model}/infer")
@router.post("/models/{oip_model}/versions/{version}/infer")
async def infer(
    oip_model: str, request: Request, version: str = dataplane.VERSION, state: IngressState = _AUTH
) -> Response:
    """Inference; JSON tensors and the binary tensor data extension (any Content-Type: tritonclient sends none)."""
    dataplane.resolve(state, oip_model, version)  # 404 before reading the body
    body = await read_body(request, state.config.limits.max_body_bytes)
    # off the event loop: 16 MiB of JSON numbers take ~0.5 s to parse here
    parsed = await asyncio.to_thread(parse_infer_request, body, request.headers.get(HEADER_LENGTH))
    outputs, outcomes = await dataplane.run_infer(state, oip_model, version, parsed.inputs, parsed.header.parameters)
    content, headers, media = encode_infer_response(oip_model, dataplane.VERSION, parsed.header, outputs)
    headers["x-vtp-batch-size"] = dataplane.batch_sizes(outcomes)
    return Response(content, media_type=media, headers=headers)


def attach_router(app: FastAPI) -> None:
    """Serve the protocol's REST routes from ``app``."""
    app.include_router(router)
