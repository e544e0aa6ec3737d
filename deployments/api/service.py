"""``/v1``'s service routes: liveness, readiness, the served models, and what the answering replica serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..model.health import readiness
from ..state import IngressState, ingress_state
from . import openapi
from .calls import MODEL_CALL, Call
from .schemas import CallerInfo, ErrorResponse, Health, ModelInfo, RequestLimits

router = APIRouter()

_STATE = Depends(ingress_state)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness of the HTTP path; never needs the API key."""
    return Health()


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(state: IngressState = _STATE) -> JSONResponse:
    """Readiness: 200 when every model has a replica that can answer, else 503 with the reasons. Each model's
    status says what serves, and what cannot be placed (``unplaceable``); never needs the API key."""
    ready, body = readiness(await state.models.readiness.statuses())
    return JSONResponse({"status": "ready" if ready else "not_ready", **body}, 200 if ready else 503)


@router.get("/v1/models", responses=openapi.ERRORS)
async def models(request: Request, state: IngressState = _STATE) -> JSONResponse:
    """The served models by name (``?model=`` / ``x-vtp-model`` values), the default, and their readiness."""
    state.authorize(state.http_caller(request.scope))
    _, body = readiness(await state.models.readiness.statuses())
    return JSONResponse({"default": state.models.default, "models": body["models"]})


@router.get("/v1/model", response_model=ModelInfo, responses=openapi.ERRORS)
async def model(call: Call = MODEL_CALL) -> ModelInfo:
    """The model, device, precision and batch settings of the replica that answers, and the request limits."""
    info = await call.call("info")  # fresh: says which replica answered
    state = call.state
    limits = RequestLimits(
        **state.config.limits.model_dump(),
        image_size=state.settings.image_size,
        api_key_required=state.keys.required,
    )
    caller = CallerInfo(
        key=call.caller.key,
        client=call.caller.client,
        model=state.budget(call.caller, "model"),
        cheap=state.budget(call.caller, "cheap"),
    )
    return ModelInfo(**info, limits=limits, caller=caller, name=call.model, models=state.models.names)
