"""Limits on how request bodies arrive: a deadline per body and a cap on the bodies one client sends at once.

Serve's proxy hands a request to the ingress as soon as its headers are in; the ingress then pulls the body
through the proxy while the request holds one of its ``max_ongoing_requests`` slots. Without limits a client that
announces a body and stalls keeps that slot forever, and a few hundred such clients fill the ingress. The
``UploadGuard`` middleware (pure ASGI, so it sees every route's body, whatever reads it) bounds both:

- **deadline**: a body must arrive whole within ``body_timeout_s`` of the request reaching the ingress, or the
  read fails with ``BodyTimeout`` (``408`` through the ingress's ``ApiError`` handler);
- **per-client uploads**: one client address may be sending at most ``max_uploads_per_client`` bodies at once;
  the next one is answered ``429`` after a pause that costs no CPU, so that a client reconnecting as soon as it is
  refused cannot make the server spin: ``refusal_delay_s`` times one more than the refusals the client already has
  waiting (``IngressState.pause_refusal``, shared with the rate limits: at most ``rate_limits.max_refusal_delay_s``
  or ``refusal_delay_s``, whichever is longer, and at once past ``rate_limits.max_pending_refusals``), before
  anything of it is read;
- a response that starts before its request's body was read whole (any early refusal: 401, 408, 413, 415, 429)
  carries ``Connection: close``, so the proxy drops the connection instead of reading the rest of the body.

Routes read bodies through ``Request.stream()`` (``deployments.requests``); the guard enforces the ``uploads``
settings of the ingress's live config (``state.installed()``; until the ingress has started, it passes requests
through untouched).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

from ray.exceptions import TaskCancelledError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics
from ..callers import client_address
from ..errors import ApiError
from ..state import installed

__all__ = ["BodyTimeout", "UploadGuard", "client_address", "has_body"]

_CLOSE = (b"connection", b"close")


class BodyTimeout(ApiError):
    """The request body did not arrive whole within the deadline."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            "body_timeout",
            f"the request body did not arrive within {timeout_s:g} s (body_timeout_s); send it faster or retry",
            headers={"Connection": "close"},
        )


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero ``Content-Length`` or chunked transfer encoding)."""
    headers = Headers(scope=scope)
    length = headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or "chunked" in headers.get(
        "transfer-encoding", ""
    ).lower()


class UploadGuard:
    """ASGI middleware enforcing the ingress's ``uploads`` settings on every HTTP request with a body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._uploading: Counter[str] = Counter()  # client address -> bodies being received now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = installed()
        if scope["type"] != "http" or state is None or not has_body(scope):
            await self.app(scope, receive, send)
            return
        policy = state.config.uploads
        client = client_address(scope, policy.client_address_header)
        cap = policy.max_uploads_per_client
        if cap and self._uploading[client] >= cap:
            # A pause before the 429 (no CPU: the request only waits): a client that reconnects as soon as it is
            # refused otherwise makes the proxy and the ingress answer hundreds of 429s a second.
            await state.pause_refusal(f"address:{client}", policy.refusal_delay_s)
            await _too_many_uploads(cap, policy.refusal_delay_s)(scope, receive, send)
            return
        with self._slot(client) as release:
            try:
                await self.app(scope, _Deadline(receive, policy.body_timeout_s, release), _closing_early(send, release))
            except (ClientDisconnect, TaskCancelledError):  # the client left mid-upload: nobody to answer
                metrics.errors().inc(tags={"kind": "client_disconnect"})

    @contextlib.contextmanager
    def _slot(self, client: str) -> Iterator[_Release]:
        self._uploading[client] += 1
        release = _Release(self._uploading, client)
        try:
            yield release
        finally:
            release()


class _Release:
    """Frees a client's upload slot once: when its body is complete, its response starts, or the request ends."""

    def __init__(self, counter: Counter[str], client: str) -> None:
        self._counter, self._client, self.done = counter, client, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._counter[self._client] -= 1
            if self._counter[self._client] <= 0:
                del self._counter[self._client]


class _Deadline:
    """An ASGI ``receive`` that raises ``BodyTimeout`` once the body is not complete by the deadline."""

    def __init__(self, receive: Receive, timeout_s: float, release: _Release) -> None:
        self._receive = receive
        self._timeout_s = timeout_s
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._release = release

    async def __call__(self) -> Message:
        if self._release.done:  # body complete (or response started): no deadline on what follows
            return await self._receive()
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            self._release()
            raise BodyTimeout(self._timeout_s) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._release()
        return message


def _closing_early(send: Send, release: _Release) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and not release.done:
            release()
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"connection" for name, _ in headers):  # a 401 says it already
                message = {**message, "headers": [*headers, _CLOSE]}
        await send(message)

    return wrapped


def _too_many_uploads(cap: int, delay_s: float) -> JSONResponse:
    metrics.errors().inc(tags={"kind": "too_many_uploads"})
    message = f"this client is already sending {cap} request bodies (max_uploads_per_client); retry later"
    retry = str(max(1, round(delay_s)))
    return JSONResponse({"error": message}, 429, headers={"Retry-After": retry, "Connection": "close"})
