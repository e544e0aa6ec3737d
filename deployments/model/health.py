"""Readiness of the model deployments, read from Serve's own status (no model call, no torch).

The ingress is up long before (and regardless of whether) a model replica is: liveness (``/healthz``,
``/v2/health/live``) says the HTTP path answers; readiness (``/readyz``, ``/v2/health/ready``, the per-model
``ready`` routes) says a model replica can answer, and why not when none can: still starting (loading weights,
waiting for resources) or failed with the loader's message. A background task polls ``serve.status()``; requests
wait on its result for a bounded time instead of queueing on a handle that may never get a replica.

Readiness is public (``/readyz`` needs no key), so its reasons say what failed, never how: one line, the error's
type and message (``FileNotFoundError: model path '...' does not exist.``), and where to look. Serve's message
holds the whole traceback, with the server's paths: that goes to the ingress's log, once per change.

A replica that Ray cannot place anywhere (its ``ray_actor_options`` ask for a resource no node has, e.g.
``{resources: {NPU: 1}}`` on a cluster without NPUs) is reported within a poll or two from Ray's own "infeasible"
verdict (``placement.pending_actors``), in ``unplaceable`` and the reason, and logged once: not left DEPLOYING in
silence. While older replicas still run (a bad ``serve deploy``), the model stays ready and says what is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ray import serve

from vtp_ray.placement import PendingActor, pending_actors

log = logging.getLogger("ray.serve")

#: The longest error a readiness answer repeats.
_MAX_CAUSE_CHARS = 300
#: A line that names a Python exception and its message (``CheckpointError: ...``, ``pkg.mod.SomeError: ...``).
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (\S.*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ModelStatus:
    """One model deployment's readiness: ``ready`` when at least one replica is running."""

    name: str
    deployment: str
    ready: bool
    state: str  # Serve's deployment status (UPDATING, HEALTHY, DEPLOY_FAILED, UNHEALTHY...) or UNKNOWN
    running_replicas: int
    reason: str  # why not ready; empty when ready
    unplaceable: str = ""  # replicas Ray cannot place on any node, and what to change; empty when none
    detail: str = field(default="", repr=False)  # Serve's whole message (a traceback): for the logs only

    def to_dict(self) -> dict[str, Any]:
        """The public fields (never ``detail``)."""
        public = asdict(self)
        del public["detail"]
        return public


def readiness(statuses: Mapping[str, ModelStatus]) -> tuple[bool, dict[str, Any]]:
    """Whether every model can answer, and the JSON every readiness route shows: the reasons of those that cannot
    (``error``) and each model's status (``models``)."""
    reasons = [status.reason for status in statuses.values() if not status.ready]
    body: dict[str, Any] = {"models": {name: status.to_dict() for name, status in statuses.items()}}
    if reasons:
        body["error"] = "; ".join(reasons)
    return not reasons, body


def read_statuses(app_name: str, deployments: Mapping[str, str]) -> dict[str, ModelStatus]:
    """The readiness of each model (name -> deployment name) of application ``app_name``, from ``serve.status()``.

    Blocking (a call to the Serve controller): run it off the event loop.
    """
    try:
        app = serve.status().applications.get(app_name)
    except Exception as e:  # the controller is unreachable or restarting: nothing can be promised
        return {name: _unknown(name, dep, f"cannot read Serve's status: {e}") for name, dep in deployments.items()}
    pending: list[PendingActor] | None = None
    statuses = {}
    for name, dep in deployments.items():
        overview = app.deployments.get(dep) if app else None
        if overview is None:
            statuses[name] = _unknown(name, dep, f"model {name!r}: deployment {dep} is not deployed (yet)")
            continue
        running = int(overview.replica_states.get("RUNNING", 0))
        state = str(getattr(overview.status, "value", overview.status))
        unplaceable = ""
        if sum(overview.replica_states.values()) > running:  # some replica is not running: placed yet?
            if pending is None:
                pending = pending_actors(f"{REPLICA_ACTOR_PREFIX}{app_name}#")
            unplaceable = _unplaceable(name, dep, [a for a in pending if a.name.split("#")[1:2] == [dep]])
        reason = "" if running else unplaceable or _reason(name, state, overview.message, overview.replica_states)
        statuses[name] = ModelStatus(name, dep, running > 0, state, running, reason, unplaceable, overview.message)
    return statuses


#: Serve's replica actors are named ``SERVE_REPLICA::<app>#<deployment>#<id>``.
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


def _unplaceable(name: str, deployment: str, pending: list[PendingActor]) -> str:
    """What to say about the replicas of a deployment that Ray reports infeasible ("" when there are none)."""
    stuck = [a for a in pending if a.infeasible]
    if not stuck:
        return ""
    asks = ", ".join(sorted({str({k: v for k, v in a.resources.items() if v}) for a in stuck}))
    return (
        f"model {name!r}: {len(stuck)} replica(s) cannot be placed: each asks for {asks} and no node of the cluster "
        f"has that (Ray reports the request infeasible). Change ray_actor_options of deployment {deployment} in the "
        "config (or args.placement), or add nodes that have it (an autoscaler may still add them)"
    )


def _unknown(name: str, deployment: str, reason: str) -> ModelStatus:
    return ModelStatus(name, deployment, False, "UNKNOWN", 0, reason)


def _reason(name: str, state: str, message: str, replicas: Mapping[Any, int]) -> str:
    cause = summarize_error(message)
    if state == "DEPLOY_FAILED":
        return f"model {name!r} failed to start: {cause or 'no reason given'} (details: the Serve logs, serve status)"
    counts = ", ".join(f"{getattr(k, 'value', k)}: {v}" for k, v in replicas.items() if v) or "none yet"
    what = f"model {name!r} has no running replica yet ({state}; replicas {counts})"
    return f"{what}: {cause}" if cause else what


def summarize_error(message: str) -> str:
    """One line of a Serve status message: the last exception it names (type and first line of its message), else
    its first line; at most ``_MAX_CAUSE_CHARS``. Tracebacks, paths of the server's code and Ray's actor details
    stay out."""
    lines = [line.rstrip() for line in _ANSI.sub("", message).splitlines() if line.strip()]
    cause = ""
    for line in lines:
        match = _EXCEPTION_LINE.fullmatch(line)
        if match and not match.group(2).startswith("Traceback ("):
            cause = f"{match.group(1)}: {match.group(2)}"
    if not cause and lines:
        cause = lines[0].strip()
    return cause if len(cause) <= _MAX_CAUSE_CHARS else cause[: _MAX_CAUSE_CHARS - 3] + "..."


class ReadinessMonitor:
    """Polls the readiness of the model deployments in the background of the ingress's event loop.

    Args:
        app_name: the Serve application the models belong to.
        deployments: model name -> deployment name.
        poll_s: seconds between two reads of Serve's status while a model is not ready.
        ready_poll_s: the same once every model is: each read costs the ingress and Serve's controller CPU that
            the model replicas on the node would otherwise have (Serve's handles notice a dead replica themselves).
    """

    def __init__(
        self, app_name: str, deployments: Mapping[str, str], poll_s: float = 1.0, ready_poll_s: float = 5.0
    ) -> None:
        self._app_name = app_name
        self._deployments = dict(deployments)
        self._poll_s = poll_s
        self._ready_poll_s = ready_poll_s
        self._statuses: dict[str, ModelStatus] = {}
        self._polled = asyncio.Event()  # set, then replaced, after every poll
        self._task: asyncio.Task[None] | None = None

    async def statuses(self) -> dict[str, ModelStatus]:
        """The latest readiness of every model (waits for the first poll)."""
        if not self._statuses:
            await self._next_poll()
        return self._statuses

    async def status(self, name: str) -> ModelStatus:
        return (await self.statuses())[name]

    async def wait_ready(self, name: str, timeout_s: float) -> ModelStatus:
        """The model's status once it is ready, or after ``timeout_s`` (then not ready, with the reason)."""
        deadline = time.monotonic() + timeout_s
        status = await self.status(name)
        while not status.ready and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._next_poll(), left)
            status = self._statuses[name]
        return status

    async def until_unavailable(self, name: str, grace_s: float) -> ModelStatus:
        """Returns once the model has had no running replica for ``grace_s``: a request waiting on it is lost."""
        while True:
            status = await self.status(name)
            if status.ready:
                await self._next_poll()
                continue
            status = await self.wait_ready(name, grace_s)
            if not status.ready:
                return status

    async def _next_poll(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll_forever())
        await self._polled.wait()

    async def _poll_forever(self) -> None:
        while True:
            statuses = await asyncio.to_thread(read_statuses, self._app_name, self._deployments)
            for name, status in statuses.items():
                before = self._statuses.get(name)
                if status.reason and status.detail and (before is None or before.reason != status.reason):
                    log.warning("%s\nServe's message:\n%s", status.reason, status.detail)
                if status.unplaceable and (before is None or before.unplaceable != status.unplaceable):
                    log.warning("%s", status.unplaceable)
                elif before is not None and before.unplaceable and not status.unplaceable:
                    log.info("model %r: every replica is placed now", name)
            self._statuses = statuses
            polled, self._polled = self._polled, asyncio.Event()
            polled.set()
            ready = all(status.ready for status in self._statuses.values())
            await asyncio.sleep(self._ready_poll_s if ready else self._poll_s)
