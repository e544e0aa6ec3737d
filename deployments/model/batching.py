"""``AdmissionGate``: lets requests into the replica's batch queue in waves, so that batches form full under load.

``@serve.batch`` forms the next batch while the previous one still runs, from whatever arrived within
``batch_wait_timeout_s`` of its first request: under load, a string of small batches (Ray 2.60 formed batches of
~1.5 at 16 clients). With the gate, once a model call has started, newcomers wait until every request let in so
far is done, then join the queue all at once: the next batches form from everything that arrived meanwhile. A
request that finds the replica idle goes straight in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class AdmissionGate:
    """An async gate: ``async with gate.admitted():`` around a request's stay in the batch queue."""

    def __init__(self) -> None:
        self._inside = 0  # requests let in and not finished yet
        self._open = asyncio.Event()
        self._open.set()

    def close(self) -> None:
        """A model call started: hold newcomers until everyone inside is done."""
        self._open.clear()

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._open.set()
