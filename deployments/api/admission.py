"""Who may ask, and how often: the ``Admission`` middleware in front of every HTTP route (``/v1``, the OIP's REST
routes, health, the page), before any body is read and before any work is queued.

For each request it identifies the caller (``state.IngressState.http_caller``: the client address, or the name of
the API key it sent), charges one request to the caller's budget for the route's kind (``model`` routes: the
image and text verbs of ``/v1`` and the OIP's infer; ``cheap``: everything else), and past the budget answers
``429`` with ``Retry-After`` after ``rate_limits.refusal_delay_s`` (``IngressState.admit``). The key itself is
checked by the routes that need one (``IngressState.authorize``, from the caller found here), so health, readiness
and the page stay open; a request with a wrong key is charged to its address. Requests of a named key get an access
log line with the key's name (the key never appears in a log).

Over gRPC the same happens in ``oip.grpc_service``'s RPC wrapper, after Serve's gRPC proxy has received the whole
message (it reads up to ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` bytes before the ingress sees anything).
"""

from __future__ import annotations

import logging
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiError, error_response
from ..state import CALLER, installed
from .uploads import has_body

log = logging.getLogger("ray.serve")

#: The routes that call a model or preprocess an upload (POST only): the rest are cheap.
MODEL_ROUTES = re.compile(
    r"/v1/(?:reconstruct|encode|decode|embed|preprocess|embed-text|classify)"
    r"|/v2/models/[^/]+(?:/versions/[^/]+)?/infer"
)


def route_kind(scope: Scope) -> str:
    """``model`` or ``cheap``: which budget a request is charged to (its path below the app's route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "model" if scope.get("method") == "POST" and MODEL_ROUTES.fullmatch(path) else "cheap"


class Admission:
    """ASGI middleware: the caller identified, its budget charged, refusals paused; access log lines of named keys."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = installed()
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        caller = state.http_caller(scope)
        scope.setdefault("state", {})[CALLER] = caller
        started = time.perf_counter()
        try:
            await state.admit(caller, route_kind(scope))
        except ApiError as e:
            response = error_response(e.status, e.kind, e.message)
            response.headers.update(e.headers or {})
            if has_body(scope):  # never read: the proxy must not wait for it
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            if caller.key is not None:
                _access_log(caller.key, caller.client, scope, e.status, started)
            return
        if caller.key is None:
            await self.app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _access_log(caller.key, caller.client, scope, status, started)


def _access_log(key: str, client: str, scope: Scope, status: int, started: float) -> None:
    # Serve's own access line has no caller: this one says which key asked (by name), next to it in the replica's
    # log (same request id); silenced with Serve's when logging_config.enable_access_log is false.
    log.info(
        "caller %s client %s %s %s %s %.1fms",
        key,
        client,
        scope.get("method", ""),
        scope.get("path", ""),
        status or "-",
        (time.perf_counter() - started) * 1000,
        extra={"serve_access_log": True},
    )
