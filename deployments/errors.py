"""What the API refuses and how every route says it: ``ApiError``, the JSON error body, the 501 of a verb a checkpoint
cannot serve. The HTTP routes (``api``, ``oip.rest``) answer ``{"error": ...}`` with the status; the gRPC adapter
(``oip.grpc_service``) turns the same error into its gRPC status with the same message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics

__all__ = ["ApiError", "describe_errors", "install_error_handlers", "invalid_json", "unsupported"]


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


#: The verbs that need a CLIP head (and, for text, CLIP's BPE vocabulary), on every route that offers them.
CLIP_VERBS = ("embed", "embed_text", "classify")


def unsupported(verb: str, info: Mapping[str, Any] | None) -> ApiError | None:
    """The refusal of a verb this checkpoint cannot serve (501), else None. ``info`` is the model's ``ReplicaInfo``
    dict; None (no replica has answered yet) is a 503 for the verbs that depend on it."""
    if verb not in CLIP_VERBS:
        return None
    if info is None:
        return ApiError(503, "not_ready", "the model's checkpoint is not known yet: no replica has answered")
    if info["embedding_dim"] is None:
        return ApiError(501, "no_clip_head", "this model has no CLIP head (train_clip is false)")
    if verb != "embed" and info.get("text_context_length") is None:
        return ApiError(501, "no_text_vocabulary", "this model's text tower does not use CLIP's BPE vocabulary")
    return None


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    """The JSON body every refusal has (counted in the ``vtp_errors`` metric by kind)."""
    metrics.errors().inc(tags={"kind": kind})
    return JSONResponse({"error": message, **extra}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Every error of ``app`` as ``{"error": ...}``: refusals, FastAPI's validation errors, unknown routes."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = error_response(exc.status, exc.kind, exc.message, **exc.extra)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        summary = describe_errors(errors)
        return error_response(422, "invalid_request", f"invalid request: {summary}", detail=jsonable_encoder(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail))
