"""Per-client token buckets with bounded memory: what the ingress's rate limits count (no Ray, no HTTP, no torch).

Every client (an address, or an API key's name) has one bucket per kind of route. A bucket holds up to ``burst``
tokens and gains ``rate`` a second; a request takes one, and a request that finds less than one is over budget
(``take`` says how long until there is one). A client never seen, or not seen for ``burst / rate`` seconds, has a
full bucket: so the table only has to remember clients seen lately, and it keeps at most ``max_clients`` of them,
forgetting the least recently seen first (an ``OrderedDict`` used as an LRU). A flood of distinct addresses
therefore costs a bounded table (about 300 bytes a client), and a forgotten client only gets a full bucket back,
which is what a new address gets anyway.

It also counts each client's refusals that are waiting out their pause (``hold`` / ``release``), so that one
client cannot keep more than ``max_pending_refusals`` of the ingress's request slots that way.

Hand-written because the libraries at hand do not fit: ``limits`` keeps a timestamp per request (moving window) or
a counter per window in a store that grows with every new client until it expires; ``aiolimiter`` is one limiter,
not one per client. The arithmetic is ten lines.
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["ClientTable", "retry_after_s"]


class _Client:
    """One client's buckets (``tokens``, ``stamp`` per kind of route) and its refusals waiting out their pause."""

    __slots__ = ("buckets", "pending")

    def __init__(self, kinds: int) -> None:
        self.buckets: list[float] = [math.inf, 0.0] * kinds  # tokens, stamp; inf: full, whatever the burst
        self.pending = 0


class ClientTable:
    """The budgets of the clients an ingress replica has seen lately, at most ``max_clients`` of them.

    Not thread-safe: the ingress calls it from its event loop only.
    """

    def __init__(self, kinds: tuple[str, ...], max_clients: int) -> None:
        self.kinds = {kind: i for i, kind in enumerate(kinds)}
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def take(self, client: str, kind: str, rate: float, burst: int, now: float) -> float:
        """Take a token from ``client``'s ``kind`` bucket: 0.0 when there was one, else the seconds until there is
        (nothing is taken then). ``rate`` 0 means no limit."""
        if rate <= 0:
            return 0.0
        entry = self._entry(client)
        i = 2 * self.kinds[kind]
        tokens = min(float(burst), entry.buckets[i] + (now - entry.buckets[i + 1]) * rate)
        entry.buckets[i + 1] = now
        if tokens >= 1.0:
            entry.buckets[i] = tokens - 1.0
            return 0.0
        entry.buckets[i] = tokens
        return (1.0 - tokens) / rate

    def wait_s(self, client: str, kind: str, rate: float, burst: int, now: float) -> float:
        """Seconds until ``client``'s ``kind`` bucket has a token (0.0 when it has one), taking nothing."""
        entry = self._clients.get(client)
        if rate <= 0 or entry is None:
            return 0.0
        i = 2 * self.kinds[kind]
        tokens = min(float(burst), entry.buckets[i] + (now - entry.buckets[i + 1]) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def hold(self, client: str, cap: int) -> bool:
        """Count one more refusal of ``client`` waiting out its pause, unless it already has ``cap`` (then False)."""
        entry = self._entry(client)
        if entry.pending >= cap:
            return False
        entry.pending += 1
        return True

    def release(self, client: str) -> None:
        """A refusal counted by ``hold`` was answered."""
        entry = self._clients.get(client)
        if entry is not None and entry.pending > 0:
            entry.pending -= 1

    def pending(self, client: str) -> int:
        """Refusals of ``client`` waiting out their pause now."""
        entry = self._clients.get(client)
        return entry.pending if entry is not None else 0

    def _entry(self, client: str) -> _Client:
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = _Client(len(self.kinds))
            while len(self._clients) > self.max_clients:
                # The least recently seen client goes; if it was still in debt (or had refusals pending) it starts
                # afresh, as a new address would.
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(client)
        return entry


def retry_after_s(wait_s: float) -> int:
    """The ``Retry-After`` value (whole seconds, at least 1) for a client whose next token is ``wait_s`` away."""
    return max(1, math.ceil(wait_s))
