"""The model deployment's scheduler (``deployments.model.batching.BatchScheduler``) on its own: online items before
batch items, model calls of one group up to ``max_batch_size``, the first online item waiting for company, batch
work's minimum share under a saturating online load. The model call is a coroutine that records what it was given
and takes a set time (the scheduler awaits it as it awaits the replica's torch thread)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from typing import Any

import pytest

from deployments.model.batching import GROW_BELOW_S, BatchScheduler
from deployments.settings import Batching


class Model:
    """Records each call as ``(group, payloads)``; a call takes ``seconds``; payload ``"boom"`` fails its call."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.calls: list[tuple[Hashable, list[Any]]] = []
        self.running = asyncio.Event()

    async def __call__(self, group: Hashable, payloads: list[Any]) -> list[Any]:
        self.calls.append((group, payloads))
        self.running.set()
        await asyncio.sleep(self.seconds)
        if "boom" in payloads:
            raise RuntimeError("model call failed")
        return [f"out:{p}" for p in payloads]


def batching(**values: Any) -> Batching:
    return Batching(**{"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "batch_min_share": 0.0, **values})


def test_online_items_go_before_waiting_batch_items_and_calls_fill_up_to_the_batch_size() -> None:
    async def run() -> Model:
        model = Model(seconds=0.05)
        scheduler = BatchScheduler(model, batching())
        first = asyncio.create_task(scheduler.submit("g", "b0", "batch"))
        await model.running.wait()  # b0 is in its model call; meanwhile 6 batch items and then 5 online ones arrive
        batch = [asyncio.create_task(scheduler.submit("g", f"b{i}", "batch")) for i in range(1, 7)]
        online = [asyncio.create_task(scheduler.submit("g", f"o{i}", "online")) for i in range(5)]
        done = await asyncio.gather(first, *batch, *online)
        assert [d.value for d in done] == [f"out:{p}" for p in ["b0", *[f"b{i}" for i in range(1, 7)]]] + [
            f"out:o{i}" for i in range(5)
        ]
        return model

    model = asyncio.run(run())
    assert [payloads for _, payloads in model.calls] == [
        ["b0"],
        ["o0", "o1", "o2", "o3"],  # online first, a full call, though the batch items came before them
        ["o4"],
        ["b1", "b2", "b3", "b4"],  # batch items only once no online item waits
        ["b5", "b6"],
    ]


def test_calls_hold_one_group_and_the_others_keep_their_order() -> None:
    async def run() -> Model:
        model = Model(seconds=0.02)
        scheduler = BatchScheduler(model, batching())
        blocker = asyncio.create_task(scheduler.submit("x", "first", "online"))
        await model.running.wait()
        items = [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5)]
        await asyncio.gather(blocker, *(scheduler.submit(g, p, "online") for g, p in items))
        return model

    model = asyncio.run(run())
    assert model.calls[1:] == [("a", [1, 3, 5]), ("b", [2, 4])]


def test_the_first_online_item_waits_for_company_up_to_the_timeout() -> None:
    async def run() -> tuple[Model, float, float]:
        model = Model()
        scheduler = BatchScheduler(model, batching(batch_wait_timeout_s=0.3))
        started = time.perf_counter()
        await scheduler.submit("g", "alone", "online")  # waits the whole timeout, then runs alone
        alone = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(scheduler.submit("g", i, "online") for i in range(4)))  # a full batch: no wait
        full = time.perf_counter() - started
        return model, alone, full

    model, alone, full = asyncio.run(run())
    assert [len(p) for _, p in model.calls] == [1, 4]
    assert 0.25 <= alone < 2 and full < 0.2


def test_a_failed_call_fails_only_its_items_and_a_cancelled_item_is_dropped() -> None:
    async def run() -> tuple[Model, list[Any]]:
        model = Model(seconds=0.02)
        scheduler = BatchScheduler(model, batching(max_batch_size=2))
        blocker = asyncio.create_task(scheduler.submit("x", "first", "online"))
        await model.running.wait()
        gone = asyncio.create_task(scheduler.submit("g", "gone", "online"))
        await asyncio.sleep(0)
        gone.cancel()
        tasks = [asyncio.create_task(scheduler.submit("g", p, "online")) for p in ("ok1", "boom", "ok2")]
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        return model, results

    model, results = asyncio.run(run())
    assert all("gone" not in payloads for _, payloads in model.calls)
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)  # ok1 shared boom's call
    assert results[3].value == "out:ok2"


@pytest.mark.parametrize("share", [0.0, 0.2])
def test_batch_work_gets_its_minimum_share_under_a_saturating_online_load(share: float) -> None:
    """Online clients that always have requests waiting; a job's block of batch items beside them. Without a
    minimum share the block waits for the whole online load; with one it gets that share of the model time."""
    calls: list[tuple[str, float]] = []

    async def run() -> None:
        model = Model(seconds=0.01)
        record = lambda group, priority, items, model_s, waits: calls.append((priority, model_s))  # noqa: E731
        scheduler = BatchScheduler(model, batching(max_batch_size=2, batch_min_share=share), on_call=record)
        stop = time.perf_counter() + 1.0

        async def client() -> None:
            while time.perf_counter() < stop:
                await scheduler.submit("online", "o", "online")

        block = asyncio.gather(*(scheduler.submit("batch", i, "batch") for i in range(1000)), return_exceptions=True)
        await asyncio.gather(*(client() for _ in range(6)))
        block.cancel()

    asyncio.run(run())
    saturated = calls[: int(len(calls) * 0.8)]  # the clients stop one by one at the end: leave that tail out
    batch_s = sum(s for priority, s in saturated if priority == "batch")
    fraction = batch_s / sum(s for _, s in saturated)
    if share == 0:
        assert batch_s == 0  # online first, always
    else:
        assert share * 0.6 <= fraction <= share * 1.5, fraction


def test_batch_work_takes_calls_of_batch_work_size_and_online_ones_keep_max_batch_size() -> None:
    async def run() -> Model:
        model = Model(seconds=0.02)
        scheduler = BatchScheduler(model, batching(batch_work_size=6))
        first = asyncio.create_task(scheduler.submit("g", "b0", "batch"))
        await model.running.wait()
        batch = [asyncio.create_task(scheduler.submit("g", f"b{i}", "batch")) for i in range(1, 9)]
        online = [asyncio.create_task(scheduler.submit("g", f"o{i}", "online")) for i in range(6)]
        await asyncio.gather(first, *batch, *online)
        scheduler.configure(batching(batch_work_size=2))  # live, from the next call on
        await asyncio.gather(*(scheduler.submit("g", f"c{i}", "batch") for i in range(3)))
        return model

    sizes = [len(payloads) for _, payloads in asyncio.run(run()).calls]
    assert sizes == [1, 4, 2, 6, 2, 2, 1]  # b0; online 4 + 2 (max_batch_size 4); batch 6 + 2; then batch by 2
    assert Batching(max_batch_size=4).call_size(batch_work=True) == 4


def test_batch_calls_grow_while_no_online_item_comes_and_drop_back_when_one_does() -> None:
    class OnlineDuringFourthCall(Model):
        """The fourth model call submits an online item while it runs."""

        scheduler: BatchScheduler
        online: asyncio.Task[Any]

        async def __call__(self, group: Hashable, payloads: list[Any]) -> list[Any]:
            if len(self.calls) == 3:
                self.online = asyncio.create_task(self.scheduler.submit("g", "o0", "online"))
            return await super().__call__(group, payloads)

    async def run(model: Model, settings: Batching) -> list[int]:
        scheduler = BatchScheduler(model, settings)
        if isinstance(model, OnlineDuringFourthCall):
            model.scheduler = scheduler
        await asyncio.gather(*(scheduler.submit("g", f"b{i}", "batch") for i in range(30)))
        if isinstance(model, OnlineDuringFourthCall):
            assert (await model.online).value == "out:o0"
        return [len(payloads) for _, payloads in model.calls]

    settings = batching(batch_work_size=2, batch_idle_work_size=8)
    # 2, then doubling while no online item comes, up to 8; the online item that arrives during the fourth call goes
    # next, and batch calls start again from batch_work_size, and stay there until no online item came for QUIET_S.
    assert asyncio.run(run(OnlineDuringFourthCall(seconds=0.005), settings)) == [2, 4, 8, 8, 1, 2, 2, 2, 2]
    # Calls that take longer than GROW_BELOW_S do not grow: their fixed cost is not worth amortizing.
    assert asyncio.run(run(Model(seconds=GROW_BELOW_S * 1.2), batching(batch_work_size=8))) == [8, 8, 8, 6]
    # batch_idle_work_size equal to batch_work_size: no growth.
    assert asyncio.run(run(Model(), batching(batch_work_size=8, batch_idle_work_size=8))) == [8, 8, 8, 6]


def test_batch_calls_take_fewer_items_where_that_many_would_take_longer_than_batch_work_max_ms() -> None:
    class PerItem(Model):
        """A call takes ``seconds`` per item."""

        async def __call__(self, group: Hashable, payloads: list[Any]) -> list[Any]:
            self.calls.append((group, payloads))
            await asyncio.sleep(self.seconds * len(payloads))
            return [f"out:{p}" for p in payloads]

    async def run(settings: Batching) -> list[int]:
        model = PerItem(seconds=0.02)
        scheduler = BatchScheduler(model, settings)
        await asyncio.gather(*(scheduler.submit("g", f"b{i}", "batch") for i in range(20)))
        return [len(payloads) for _, payloads in model.calls]

    # The first call has no time per item to go by: batch_work_size (8, 160 ms). Then 50 ms at 20 ms an item: 2.
    assert asyncio.run(run(batching(max_batch_size=8, batch_work_max_ms=50))) == [8, 2, 2, 2, 2, 2, 2]
    # 0: no bound (and calls over GROW_BELOW_S do not grow).
    assert asyncio.run(run(batching(max_batch_size=8, batch_work_max_ms=0))) == [8, 8, 4]


def test_the_idle_call_size_defaults_to_four_batch_calls_and_is_never_smaller() -> None:
    assert Batching(max_batch_size=4).idle_call_size == 16
    assert Batching(max_batch_size=4, batch_work_size=16).idle_call_size == 64
    assert Batching(max_batch_size=512).idle_call_size == 1024
    # What a compiling replica compiles for: the largest call of any kind.
    assert Batching(max_batch_size=4, batch_work_size=16).largest_call == 64
    assert Batching(max_batch_size=4, batch_work_size=2, batch_idle_work_size=2).largest_call == 4
    with pytest.raises(ValueError, match=r"batch_idle_work_size \(4\) must be at least batch_work_size"):
        Batching(max_batch_size=8, batch_idle_work_size=4)
