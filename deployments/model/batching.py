"""``BatchScheduler``: the model deployment's one queue of work, online requests first.

Every input is an item of one of two priorities: ``online`` (an HTTP or OIP request) and ``batch`` (the inputs of a
job's block, ``ModelDeployment.run_block``). One loop forms the model calls, one at a time: up to
``max_batch_size`` items of one group (same verb and input shape; all texts of ``embed_text``), taken from the
online queue whenever an online item waits (the first one waits up to ``batch_wait_timeout_s`` for company), from
the batch queue only when none does (up to ``batch_work_size`` items, by default ``max_batch_size`` too). Items that
arrive during a model call wait for the next one together, so batches fill under load with no timeout at all.

While no online item comes, batch calls grow: once none has come for ``QUIET_S``, each batch call that took under
``GROW_BELOW_S`` lets the next take twice as many items, up to ``batch_idle_work_size``; the next online
arrival drops them back to ``batch_work_size``. Where a call's fixed cost is much of its time (a CPU replica, a small
model), a job on an otherwise idle app runs at the rate of large calls, and online traffic still only ever waits
behind calls of ``batch_work_size``, or behind the one call that was running when it came. And whatever their
size, batch calls take fewer items (one at least) where that many would take longer than ``batch_work_max_ms`` at
the time per item the group's batch calls took (``_learn_item_time``): with a large model on a slow device, an online
request waits about that long at most, not a whole call of ``batch_work_size``. (A group's first batch call has no
time to go by: it takes ``batch_work_size`` items.)

So a waiting online request never waits behind more than the model call already running, whatever a job has
queued. Batch work never starves either: while batch items wait beside a saturating online load, they are owed
``batch_min_share`` of the model time, and get a model call whenever what they are owed covers one.

This replaces ``@serve.batch`` (one FIFO queue, which a job's inputs would fill ahead of online requests) and the
admission gate that made its batches fill.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..settings import Batching

__all__ = ["PRIORITIES", "BatchScheduler", "Done", "Priority"]

Priority = Literal["online", "batch"]
PRIORITIES: tuple[Priority, ...] = ("online", "batch")

#: Batch calls grow while no online item comes only while each takes under this: past it a call's fixed cost is a
#: small part of its time, and a larger one would only lengthen what the next online arrival waits behind.
GROW_BELOW_S = 0.05
#: ... and only once no online item has come for this long: under a steady online load the gaps between arrivals are
#: often longer than a short batch call, and calls that grew in them would be what the next arrival waits behind.
QUIET_S = 1.0

#: One model call: ``(group, payloads) -> one result per payload``.
ModelCall = Callable[[Hashable, list[Any]], Awaitable[list[Any]]]


@dataclass(frozen=True)
class Done:
    """One item's result and how it was served."""

    value: Any
    batch_size: int  # items in its model call
    queue_ms: float  # from submitting until its model call started
    model_ms: float  # its model call


@dataclass
class _Item:
    group: Hashable
    payload: Any
    enqueued: float
    future: asyncio.Future[Done]


@dataclass
class _Totals:
    """What one priority got: items, model calls, model seconds; for batch, the calls it was owed by its minimum
    share while online items waited (the only way a waiting online item can wait behind a batch call)."""

    items: int = 0
    calls: int = 0
    model_s: float = 0.0
    ahead_of_online: int = 0


@dataclass
class BatchScheduler:
    """Forms model calls from online and batch items; see the module docstring.

    Args:
        call: one model call on a group's payloads (awaited on the event loop; it should run the model elsewhere).
        batching: ``max_batch_size``, ``batch_wait_timeout_s``, ``batch_min_share``, ``batch_work_size``
            (``configure`` changes them).
        on_call: told of every model call: ``(group, priority, items, model seconds, queue waits in seconds)``.
    """

    call: ModelCall
    batching: Batching
    on_call: Callable[[Hashable, Priority, int, float, list[float]], None] | None = None
    totals: dict[Priority, _Totals] = field(default_factory=lambda: {p: _Totals() for p in PRIORITIES})
    _queues: dict[Priority, deque[_Item]] = field(default_factory=lambda: {p: deque() for p in PRIORITIES})
    _arrived: asyncio.Event | None = None
    _loop_task: asyncio.Task[None] | None = None
    _owed_s: float = 0.0  # batch model time owed by the minimum share
    _last_call_s: float = 0.0  # the latest model call's duration: what a batch call is expected to take
    _online_arrived: float = float("-inf")  # when the latest online item was submitted
    _batch_s: float = 0.0  # how long the latest batch call took
    _batch_most: int = 0  # the items it could take (0: start again from batch_work_size)
    _item_s: dict[Hashable, float] = field(default_factory=dict)  # per group: a batch call's seconds per item

    def configure(self, batching: Batching) -> None:
        """New batching settings, from the next model call on."""
        self.batching = batching
        self._batch_most = 0
        if self._arrived is not None:
            self._arrived.set()

    async def submit(self, group: Hashable, payload: Any, priority: Priority) -> Done:
        """Queue one input; its result once its model call is done (the call's exception if it failed)."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        item = _Item(group, payload, time.perf_counter(), loop.create_future())
        if priority == "online":
            self._online_arrived = item.enqueued
        self._queues[priority].append(item)
        self._arrived.set()
        return await item.future

    def waiting(self) -> dict[Priority, int]:
        """Items waiting for a model call, by priority."""
        return {p: sum(not i.future.done() for i in q) for p, q in self._queues.items()}

    # ------------------------------------------------------------------------------------------- the loop

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            self._drop_cancelled()
            if not any(self._queues.values()):
                self._arrived.clear()
                await self._arrived.wait()
                continue
            priority = self._next_priority()
            if priority == "online":
                await self._wait_for_company()
                if not self._queues["online"]:  # every waiting request was cancelled meanwhile
                    continue
            queue = self._queues[priority]
            most = self._batch_call_size(queue[0].group) if priority == "batch" else self.batching.max_batch_size
            await self._serve(priority, self._take(queue, most))

    def _batch_call_size(self, group: Hashable) -> int:
        """``batch_work_size``, or twice the last batch call's if no online item came for ``QUIET_S`` and it was
        short (up to ``batch_idle_work_size``); fewer if that many would take longer than ``batch_work_max_ms``."""
        quiet = time.perf_counter() - self._online_arrived >= QUIET_S
        if quiet and self._batch_most > 0 and self._batch_s < GROW_BELOW_S:
            most = min(2 * self._batch_most, self.batching.idle_call_size)
        else:
            most = self.batching.call_size(batch_work=True)
        bound_s, item_s = self.batching.batch_work_max_ms / 1000, self._item_s.get(group)
        if bound_s and item_s:
            most = max(1, min(most, int(bound_s / item_s)))
        self._batch_most = most
        return most

    def _next_priority(self) -> Priority:
        online, batch = self._queues["online"], self._queues["batch"]
        if not batch:
            return "online"
        if not online:
            return "batch"
        # Both wait: online goes first unless the batch items are owed a call by their minimum share.
        return "batch" if self._owed_s >= self._last_call_s > 0 else "online"

    async def _wait_for_company(self) -> None:
        """Let the head online item wait up to ``batch_wait_timeout_s`` (from its arrival) for a full batch."""
        assert self._arrived is not None
        queue = self._queues["online"]
        deadline = queue[0].enqueued + self.batching.batch_wait_timeout_s
        while queue and sum(i.group == queue[0].group for i in queue) < self.batching.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return
            self._drop_cancelled()

    def _take(self, queue: deque[_Item], most: int) -> list[_Item]:
        """Up to ``most`` items of the head item's group, in order; the others keep their places."""
        group = queue[0].group
        taken: list[_Item] = []
        kept: list[_Item] = []
        for item in queue:
            if item.group == group and len(taken) < most:
                taken.append(item)
            else:
                kept.append(item)
        queue.clear()
        queue.extend(kept)
        return taken

    async def _serve(self, priority: Priority, items: list[_Item]) -> None:
        others_waited = bool(self._queues["batch" if priority == "online" else "online"])
        started = time.perf_counter()
        try:
            values = await self.call(items[0].group, [item.payload for item in items])
        except Exception as e:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
            values = None
        model_s = time.perf_counter() - started
        if priority == "batch":
            self._batch_s = model_s
            self._learn_item_time(items[0].group, model_s / len(items))
        self._account(priority, len(items), model_s, others_waited)
        if self.on_call is not None:
            self.on_call(items[0].group, priority, len(items), model_s, [started - i.enqueued for i in items])
        if values is None:
            return
        for item, value in zip(items, values, strict=True):
            if not item.future.done():  # a cancelled request: its result is dropped
                queue_ms = (started - item.enqueued) * 1000
                item.future.set_result(Done(value, len(items), queue_ms, model_s * 1000))

    def _learn_item_time(self, group: Hashable, item_s: float) -> None:
        """A batch call's time per item: taken at once when lower, a quarter of the way when higher. A small call
        costs more per item (a call's fixed cost), and taking it whole would keep the calls small: a tail of one
        item would make every later call one item."""
        known = self._item_s.get(group)
        self._item_s[group] = item_s if known is None or item_s < known else known + (item_s - known) / 4

    def _account(self, priority: Priority, items: int, model_s: float, others_waited: bool) -> None:
        totals = self.totals[priority]
        totals.items += items
        totals.calls += 1
        totals.model_s += model_s
        totals.ahead_of_online += priority == "batch" and others_waited
        self._last_call_s = model_s
        share = self.batching.batch_min_share
        if priority == "online" and not others_waited:
            self._owed_s = 0.0  # nothing is owed to batch items that were not there
        elif priority == "online" and share > 0:
            self._owed_s += model_s * share / (1 - share)
        else:
            self._owed_s = max(0.0, self._owed_s - model_s)

    def _drop_cancelled(self) -> None:
        for queue in self._queues.values():
            if any(item.future.done() for item in queue):
                kept = [item for item in queue if not item.future.done()]
                queue.clear()
                queue.extend(kept)
