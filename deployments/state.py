"""``IngressState``: the one object every route of an ingress replica reads (HTTP ``/v1``, the OIP over REST and
gRPC, the upload guard, the admission middleware): the served models, the app's fixed settings, the live
``IngressConfig``, the valid API keys (``callers.KeyRing``) and every client's rate-limit budgets
(``ratelimit.ClientTable``). The ingress builds it when it starts and installs it for its process (``install``;
every Serve replica is a process of its own), and replaces its ``config`` and keys on ``reconfigure``; nothing else
holds per-ingress state.

Rate limits live in each ingress replica: with N ingress replicas, a client whose requests Serve's proxies spread
over all of them gets up to N times its budget (Serve picks replicas at random, two at a time, and the shorter
queue wins: the spread is even on average).

Why not FastAPI's ``app.state``: Serve pickles the ingress's FastAPI app by value into the replica, so the app that
serves requests is a copy the ingress's ``__init__`` cannot reach (it sees the module's own ``app``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vtp_ray.images import ImageLimits

from . import metrics
from .callers import Caller, KeyRing, client_address
from .errors import ApiError
from .model.selection import ModelSet
from .ratelimit import ClientTable, retry_after_s
from .requests import image_limits
from .settings import AppSettings, Budget, IngressConfig

__all__ = ["CALLER", "ROUTE_KINDS", "IngressState", "RateLimited", "ingress_state", "install", "installed"]

log = logging.getLogger("ray.serve")

#: The kinds of route, each with its own budget: ``model`` (a model call, or an upload's preprocessing), ``cheap``.
ROUTE_KINDS = ("model", "cheap")
#: Where an HTTP request's ``Caller`` is kept (``scope["state"]``, i.e. ``request.state``) once it is identified.
CALLER = "vtp_caller"


class RateLimited(ApiError):
    """A request past its client's budget (429, ``Retry-After``)."""

    def __init__(self, caller: Caller, kind: str, budget: Budget, retry_after: int) -> None:
        who = f"API key '{caller.key}'" if caller.key is not None else "this client address"
        super().__init__(
            429,
            "rate_limited",
            f"{who} is over its rate limit of {budget.rate:g} {kind} requests a second ({budget.burst} at once): "
            f"retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


@dataclass
class IngressState:
    """The models behind this ingress, the app's settings (fixed for the replica's life) and the live config."""

    models: ModelSet
    settings: AppSettings
    config: IngressConfig
    keys: KeyRing = field(init=False)
    clients: ClientTable = field(init=False)

    def __post_init__(self) -> None:
        self.keys = KeyRing(self.settings, self.config)
        self.clients = ClientTable(ROUTE_KINDS, self.config.rate_limits.max_clients)

    def reconfigure(self, changes: dict[str, Any] | None) -> None:
        """Apply a ``user_config`` over the app's groups (keys it leaves out keep the app's values) and read the
        key file again; a config that does not validate raises, and Serve reports the deployment unhealthy with
        the message. Clients keep their buckets (a new burst applies from their next request)."""
        config = self.settings.ingress_config().merged(changes)
        if self.settings.image_size > config.limits.max_image_size:
            raise ValueError(
                f"limits.max_image_size {config.limits.max_image_size} is below image_size {self.settings.image_size}"
            )
        keys = KeyRing(self.settings, config)
        self.config, self.keys = config, keys
        self.clients.max_clients = config.rate_limits.max_clients
        self.models.wait_s = config.limits.model_wait_s
        log.info("ingress settings: %s; API keys: %s", config.model_dump(exclude={"keys"}), keys.names or "none")

    @property
    def image_limits(self) -> ImageLimits:
        """What the image loader enforces on uploads (``max_body_bytes``, ``max_pixels``)."""
        return image_limits(self.config.limits)

    def identify(self, authorization: str | None, client: str) -> Caller:
        """The caller of a request from ``client`` that sent ``authorization`` (a header or gRPC metadata value)."""
        return Caller(client, self.keys.identify(authorization))

    def http_caller(self, scope: Mapping[str, Any]) -> Caller:
        """An HTTP request's caller: as the admission middleware identified it, else identified now."""
        caller = scope.get("state", {}).get(CALLER)
        if caller is None:
            authorization = next((v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), b"")
            address = client_address(scope, self.config.uploads.client_address_header)
            caller = self.identify(authorization.decode("latin-1"), address)
        return caller

    def budget(self, caller: Caller, kind: str) -> Budget:
        """The budget ``caller``'s requests of ``kind`` are charged to: its key's own, else the default."""
        own = self.keys.budget(caller.key, kind) if caller.key is not None else None
        return own if own is not None else getattr(self.config.rate_limits, kind)

    async def admit(self, caller: Caller, kind: str) -> None:
        """Charge one request of ``kind`` to ``caller``'s budget. Past it, ``RateLimited`` after a pause that costs
        no CPU: ``refusal_delay_s`` times one more than the refusals the client already has waiting (at most
        ``max_refusal_delay_s``; at once when it has ``max_pending_refusals``). A client that asks again as soon as
        it is refused thus gets about one refusal per ``refusal_delay_s``, however many connections it opens (up to
        the cap): it cannot make the server spin."""
        policy = self.config.rate_limits
        budget = self.budget(caller, kind)
        identity, now = caller.identity, asyncio.get_running_loop().time()
        tags = {"caller": caller.key or "anonymous", "route": kind}
        if not self.clients.take(identity, kind, budget.rate, budget.burst, now):
            metrics.requests().inc(tags={**tags, "outcome": "admitted"})
            return
        metrics.requests().inc(tags={**tags, "outcome": "rate_limited"})
        await self.pause_refusal(identity, policy.refusal_delay_s)
        wait = self.clients.wait_s(identity, kind, budget.rate, budget.burst, asyncio.get_running_loop().time())
        raise RateLimited(caller, kind, budget, retry_after_s(wait))

    async def pause_refusal(self, identity: str, delay_s: float) -> None:
        """Wait before refusing a request of ``identity`` (a rate limit, the upload cap): ``delay_s`` times one more
        than the refusals it already has waiting, at most ``rate_limits.max_refusal_delay_s`` (or ``delay_s``,
        whichever is longer); no wait once it has ``rate_limits.max_pending_refusals`` waiting (each holds an
        ingress slot meanwhile)."""
        policy = self.config.rate_limits
        waiting = self.clients.pending(identity)
        if not self.clients.hold(identity, policy.max_pending_refusals):
            return
        try:
            await asyncio.sleep(min(delay_s * (waiting + 1), max(delay_s, policy.max_refusal_delay_s)))
        finally:
            self.clients.release(identity)

    def authorize(self, caller: Caller) -> None:
        """401 unless no API key is configured or ``caller`` sent a valid one (``KeyRing.identify``)."""
        if self.keys.required and caller.key is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer", "Connection": "close"},  # its body is never read
            )


_installed: IngressState | None = None


def install(state: IngressState) -> None:
    """Make ``state`` the state of this process's ingress (called by the ingress when it starts)."""
    global _installed
    _installed = state


def installed() -> IngressState | None:
    """This process's ingress state, None before the ingress has started."""
    return _installed


async def ingress_state() -> IngressState:
    """The serving ingress's state (503 while the ingress starts): a FastAPI dependency of every route.

    Every dependency of the routes is ``async`` (none blocks): FastAPI runs a plain ``def`` one in a worker thread,
    and anyio's hand-off looks at every task of the event loop, so with hundreds of requests in flight (stalled
    uploads, paused refusals) each hop cost more than the request's own work (py-spy, benchmarks/hostile_load.py)."""
    if _installed is None:
        raise ApiError(503, "not_ready", "the ingress is starting")
    return _installed
