"""The KServe Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService`` behind Serve's gRPC proxy.

Serve's config names this module's servicer function, which registers the protocol's RPCs with the proxy:

    grpc_options:
      port: 8001
      grpc_servicer_functions: [deployments.oip.add_inference_service]

(``deployments.oip_grpc.add_inference_service``, the name of earlier configs, works too.)

The proxy then calls the ingress method named like the RPC (``ModelInfer``, ``ServerReady``...), which the ingress
class inherits from ``InferenceService``. Requests cross the proxy as the bytes the client sent (the proxy never
parses them) and are parsed in the ingress with the protocol's generated code as ``tritonclient`` ships it: Triton's
``grpc_service.proto`` is a superset of KServe's ``grpc_predict_v2.proto`` with the same package, service, messages
and field numbers, so tritonclient.grpc, KServe's ``InferenceGRPCClient`` and any other OIP gRPC client talk to it.

Models, tensors, batching, limits, rate limits and the API key (metadata ``authorization: Bearer <key>``) are those
of the REST routes: both adapt ``dataplane`` and read the ingress's one ``IngressState``; a refused request ends
with the gRPC status of its HTTP one (``INVALID_ARGUMENT`` for 400, ``RESOURCE_EXHAUSTED`` for 429 with the
trailing metadata ``retry-after``...) and the same message. ``ModelInfer`` is charged to the caller's model
budget, the other RPCs to its cheap one; the client is the peer Serve's gRPC proxy saw (or the last entry of the
metadata ``uploads.client_address_header`` behind a load balancer). Serve's gRPC proxy receives the whole message
before the ingress sees any of it (up to ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` bytes, 2 GiB unless set where Ray
starts): the key, the rate limit and ``max_body_bytes`` are checked after that, so lower that cap where clients
are not trusted. Inputs come as
``raw_input_contents`` (what the clients send) or typed ``contents``; outputs always go back as
``raw_output_contents``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from ray.serve.grpc_util import RayServegRPCContext

from .. import metrics
from ..callers import grpc_client_address
from ..errors import ApiError
from ..state import IngressState
from . import dataplane
from .tensors import check_outputs, datatype_of, tensor_from_raw, tensor_from_values, tensor_to_raw

logger = logging.getLogger(__name__)
access_log = logging.getLogger("ray.serve")  # Serve's replica log, where its own access lines go

SERVICE = "inference.GRPCInferenceService"
SERVICER_FUNCTION = "deployments.oip.add_inference_service"
#: The RPCs served (``<rpc>Request`` in, ``<rpc>Response`` out); the others of Triton's service answer UNIMPLEMENTED.
RPCS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer", "RepositoryIndex")

#: The gRPC status of each HTTP status the API answers with.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: The typed field of ``InferTensorContents`` that holds each datatype (FP16 has none: raw contents only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@functools.cache
def messages() -> Any:
    """The protocol's message classes (imported on the first gRPC request: the HTTP API does not need them)."""
    from tritonclient.grpc import service_pb2

    return service_pb2


def add_inference_service(servicer: Any, server: grpc.Server) -> None:
    """Registers the served RPCs of ``inference.GRPCInferenceService`` with Serve's gRPC proxy (which replaces their
    behaviour with its own routing): requests stay bytes, for the ingress to parse."""
    handlers = {rpc: grpc.unary_unary_rpc_method_handler(getattr(servicer, rpc)) for rpc in RPCS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _rpc(*, key: bool = True) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """An RPC of the service: charges the caller's budget (``ModelInfer`` its model one), checks the API key (unless
    ``key`` is False), parses the request and turns a refusal into the gRPC status of its HTTP one, answering an
    empty response message."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        request_type, response_type = f"{method.__name__}Request", f"{method.__name__}Response"
        kind = "model" if method.__name__ == "ModelInfer" else "cheap"

        @functools.wraps(method)
        async def rpc(self: Any, raw: bytes, grpc_context: RayServegRPCContext) -> Any:
            state: IngressState = self.state
            started = time.perf_counter()
            metadata = dict(grpc_context.invocation_metadata())
            client = grpc_client_address(grpc_context.peer(), metadata, state.config.uploads.client_address_header)
            caller = state.identify(metadata.get("authorization"), client)
            try:
                await state.admit(caller, kind)
                if key:
                    state.authorize(caller)
                limit = state.config.limits.max_body_bytes
                if len(raw) > limit:  # REST's body limit (the proxy itself takes up to 2 GiB)
                    raise ApiError(413, "too_large", f"{len(raw)} bytes, over max_body_bytes {limit}")
                try:
                    request = getattr(messages(), request_type).FromString(raw)
                except DecodeError as e:
                    raise ApiError(400, "bad_grpc_message", f"not a {request_type}: {e}") from e
                response = await method(self, state, request, grpc_context)
                code, details = grpc.StatusCode.OK, ""
            except ApiError as e:
                metrics.errors().inc(tags={"kind": e.kind})
                code, details = STATUS_CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message
                if e.headers and "Retry-After" in e.headers:
                    grpc_context.set_trailing_metadata([("retry-after", e.headers["Retry-After"])])
            except Exception as e:  # a bug: the client gets its type and message, the log the traceback
                logger.exception("gRPC %s failed", method.__name__)
                metrics.errors().inc(tags={"kind": "internal"})
                code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
            if caller.key is not None:  # which key asked, by name (Serve's access line has no caller)
                access_log.info(
                    "caller %s client %s gRPC %s %s %.1fms",
                    caller.key,
                    caller.client,
                    method.__name__,
                    code.name,
                    (time.perf_counter() - started) * 1000,
                    extra={"serve_access_log": True},
                )
            if code == grpc.StatusCode.OK:
                return response
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            return getattr(messages(), response_type)()

        return rpc

    return wrap


class InferenceService:
    """The RPCs of ``inference.GRPCInferenceService`` this server answers; Serve calls them by name. The class that
    mixes it in (the ingress) provides ``state``, its ``IngressState``."""

    state: IngressState

    @_rpc(key=False)
    async def ServerLive(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Liveness: the gRPC path answers (never needs the API key)."""
        return messages().ServerLiveResponse(live=True)

    @_rpc(key=False)
    async def ServerReady(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Readiness: every served model has a replica that can answer (``/readyz`` says why not)."""
        ready, _ = await dataplane.ready(state)
        return messages().ServerReadyResponse(ready=ready)

    @_rpc()
    async def ServerMetadata(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Server name, version and protocol extensions."""
        return messages().ServerMetadataResponse(**dataplane.SERVER_METADATA)

    @_rpc()
    async def ModelReady(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Whether the OIP model's checkpoint has a replica that can answer (NOT_FOUND for an unknown model)."""
        status = await dataplane.model_status(state, request.name, request.version)
        return messages().ModelReadyResponse(ready=status.ready)

    @_rpc()
    async def ModelMetadata(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """The OIP model's inputs and outputs, -1 for variable dimensions."""
        return messages().ModelMetadataResponse(**await dataplane.metadata(state, request.name, request.version))

    @_rpc()
    async def RepositoryIndex(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """The model repository extension's index (``ready``: only the models that can answer)."""
        models = [m for m in await dataplane.index(state) if m["state"] == "READY" or not request.ready]
        return messages().RepositoryIndexResponse(models=models)

    @_rpc()
    async def ModelInfer(self, state: IngressState, request: Any, grpc_context: RayServegRPCContext) -> Any:
        """Inference: N images (or latents) in one request are N entries of the model's batch queue."""
        version = request.model_version or dataplane.VERSION
        parameters = {
            name: getattr(p, p.WhichOneof("parameter_choice") or "", None) for name, p in request.parameters.items()
        }
        inputs = await asyncio.to_thread(_inputs, request)  # typed contents: ~0.16 s per 4M elements
        outputs, outcomes = await dataplane.run_infer(state, request.model_name, version, inputs, parameters)
        grpc_context.set_trailing_metadata([("x-vtp-batch-size", dataplane.batch_sizes(outcomes))])
        return _response(request, version, outputs)


def _inputs(request: Any) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ApiError(
            400, "bad_infer_request", f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one each"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in inputs:
            raise ApiError(400, "bad_infer_request", f"input {name!r} appears twice")
        if raw:
            inputs[name] = tensor_from_raw(name, datatype, shape, raw[i])
        elif datatype in CONTENTS_FIELDS:
            inputs[name] = tensor_from_values(
                name, datatype, shape, list(getattr(tensor.contents, CONTENTS_FIELDS[datatype]))
            )
        else:
            raise ApiError(400, "bad_infer_request", f"input {name!r}: {datatype} needs raw_input_contents")
    return inputs


def _response(request: Any, version: str, outputs: dict[str, np.ndarray]) -> Any:
    wanted = [o.name for o in request.outputs] or list(outputs)
    check_outputs(wanted, outputs)
    response = messages().ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name in wanted:
        array = outputs[name]
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        response.raw_output_contents.append(tensor_to_raw(array))
    return response
