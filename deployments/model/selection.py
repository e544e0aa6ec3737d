"""The served models, by name: one model deployment (and handle) each, behind one ingress.

Several checkpoints are served as one Serve deployment per model (``VTPReplica`` for the default model,
``VTPReplica-<name>`` for the others), not ``serve.multiplexed``: each model keeps its own batch queue (requests of
different checkpoints never share a model call), its own replicas, placement and autoscaling in the config's
``deployments:`` section, and no request ever waits for another checkpoint to be swapped in.

A request names its model with ``?model=<name>`` or the header ``x-vtp-model`` on the HTTP API
(``requested_model``), or with the model segment of the OIP routes; ``ModelSet.resolve`` turns that name (None: the
default) into a served model or a 404.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..errors import ApiError
from .health import ModelStatus, ReadinessMonitor
from .protocol import deployment_name

MODEL_HEADER = "x-vtp-model"


def requested_model(query: Mapping[str, str], headers: Mapping[str, str]) -> str | None:
    """The model an HTTP request names: ``?model=`` (wins), else the ``x-vtp-model`` header; None: the default."""
    return query.get("model") or (headers.get(MODEL_HEADER) or "").strip() or None


@dataclass(frozen=True)
class ServedModel:
    name: str
    deployment: str
    handle: DeploymentHandle

    @functools.cached_property
    def by_value(self) -> DeploymentHandle:
        """``handle`` for the calls ``fits_by_value`` admits (see ``_by_value``)."""
        return _by_value(self.handle)


class ModelSet:
    """The models behind one ingress: pick one by name, check it is ready, call it with bounded waiting.

    Args:
        handles: model name -> handle of its deployment (the default model first).
        default: the name used when a request names none.
        app_name: the Serve application (for readiness).
        wait_s: how long a request waits for a replica of its model before a 503 with the reason (live: the
            ingress sets it on reconfigure).
    """

    def __init__(self, handles: Mapping[str, DeploymentHandle], default: str, app_name: str, wait_s: float) -> None:
        self.default = default
        self._models = {
            name: ServedModel(name, deployment_name(name, name == default), handle) for name, handle in handles.items()
        }
        self.readiness = ReadinessMonitor(app_name, {m.name: m.deployment for m in self._models.values()})
        self.wait_s = wait_s
        self._info: dict[str, dict[str, Any]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def resolve(self, name: str | None) -> str:
        """A requested model name (None: the default) -> a served name, or a 404 naming the served ones."""
        name = name or self.default
        if name not in self._models:
            raise ApiError(404, "unknown_model", f"no model named {name!r}; served: {', '.join(self._models)}")
        return name

    async def info(self, name: str) -> dict[str, Any]:
        """The model's ``ReplicaInfo`` dict (cached: every replica of a deployment serves the same checkpoint)."""
        if name not in self._info:
            self._info[name] = await self.call(name, "info")
        return self._info[name]

    def cached_info(self, name: str) -> dict[str, Any] | None:
        """The model's ``ReplicaInfo`` dict if a replica has answered ``info`` before, else None (no call)."""
        return self._info.get(name)

    async def call(self, name: str, method: str, *args: Any) -> Any:
        """``method(*args)`` on a replica of model ``name``: 503 with the reason within ``wait_s`` when no replica
        can answer (starting, failed, or all gone while the request waited), never a hang."""
        status = await self.readiness.wait_ready(name, self.wait_s)
        if not status.ready:
            raise _unavailable(status)
        served = self._models[name]
        handle = served.by_value if fits_by_value(method, args) else served.handle
        response = getattr(handle, method).remote(*args)
        answer = asyncio.ensure_future(response)
        lost = asyncio.ensure_future(self.readiness.until_unavailable(name, self.wait_s))
        try:
            await asyncio.wait({answer, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not answer.done():
            response.cancel()
            answer.cancel()
            raise _unavailable(lost.result())
        try:
            return answer.result()
        except BackPressureError as e:
            raise ApiError(
                503,
                "overloaded",
                "the model replicas are at capacity (max_queued_requests); retry later",
                headers={"Retry-After": "1"},
            ) from e
        except RayTaskError as e:
            raise ApiError(500, "model", f"the model call failed: {e.cause}") from e
        except (RayActorError, grpc.aio.AioRpcError) as e:  # the latter: lost by value (below)
            raise ApiError(
                503, "replica_died", "the model replica died during the request; retry", headers={"Retry-After": "1"}
            ) from e


#: The largest input sent by value: past it, Ray's object store (shared memory on one node) beats copying the bytes
#: through gRPC, and Serve's replica-to-replica gRPC messages are capped at 4 MiB.
BY_VALUE_MAX_BYTES = 1 << 20


def fits_by_value(method: str, args: tuple[Any, ...]) -> bool:
    """Whether a model call's request and answer are small enough to go by value: inputs of at most
    ``BY_VALUE_MAX_BYTES`` whose answer is no larger (not decode: an image has several times its latents' bytes)."""
    if method not in ("run", "classify", "info") or (method == "run" and args[0] == "decode"):
        return False
    return sum(a.nbytes for a in args if isinstance(a, np.ndarray)) <= BY_VALUE_MAX_BYTES


def _by_value(handle: DeploymentHandle) -> DeploymentHandle:
    """``handle`` sending its requests and answers by value, over the gRPC channel Serve keeps between replicas.

    By reference (Serve's default), an argument or answer past Ray's inline limit (100 KB; a 256 px image is 196 KB)
    goes through the object store, twice per request. By value, the ingress-to-model round trip at one client fell
    from 8 to 4.6 ms and 16 clients reached 0.90-0.97 of the direct replica's throughput instead of 0.81
    (``benchmarks/serve_load.py``, 2 CPU cores). Ray's documented ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode makes this
    every handle's default; here it is chosen per call, whatever the cluster's setting. Ray releases without the
    option keep the default.
    """
    return handle.options(_by_reference=False) if _BY_VALUE_SUPPORTED else handle


_BY_VALUE_SUPPORTED = "_by_reference" in inspect.signature(DeploymentHandle.options).parameters


def _unavailable(status: ModelStatus) -> ApiError:
    return ApiError(503, "not_ready", status.reason, headers={"Retry-After": "5"}, model=status.name)
