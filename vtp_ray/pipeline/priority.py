"""A job's CPU priority beside a serving app: its own work takes the cores only when the app's processes leave them.

On a Serve app's cluster (``PipelineSpec.serve``) a job's preprocess tasks and model-stage actors share the nodes'
cores with the app's proxy, ingress and model replicas. The model replicas already take the job's inputs only when no
online request waits; ``PipelineSpec.cpu_priority`` ``idle`` does the same for the CPU: the job's work runs under
Linux's ``SCHED_IDLE`` policy, so the kernel gives a core to the app's work first and to the job's whenever it would
otherwise idle (not a strict order: an idle-policy thread keeps a small share under full load, so it never starves).
Niceness would not do: Ray starts every worker, the app's included, at niceness 15 (``RAY_worker_niceness``), which
leaves 4 levels (a 2.4:1 weight) below it; ``SCHED_IDLE`` weighs 3 against a niceness-15 thread's 36.

Linux keeps the policy per thread, and an unprivileged thread cannot leave ``SCHED_IDLE``. So a task's work runs in a
thread of its own (``job_priority``) while the Ray worker's main thread keeps its policy: the worker serves any later
task unchanged, and the job needs no worker processes of its own (which would add to its start-up). On the driver,
Ray Data's executor is started from that thread too (``each_at_idle_priority``): a driver started from a shell runs
at niceness 0, which would outrank every Ray worker, the app's included. The driver's own thread keeps its priority.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

__all__ = ["CPU_PRIORITIES", "CpuPriority", "each_at_idle_priority", "job_priority", "lower_this_thread"]

T = TypeVar("T")
CpuPriority = Literal["idle", "normal"]
CPU_PRIORITIES: tuple[CpuPriority, ...] = ("idle", "normal")


def lower_this_thread() -> None:
    """Put the calling thread (and the threads it starts from now on) under ``SCHED_IDLE``; where the platform has
    no such policy, at the lowest priority niceness gives."""
    tid = threading.get_native_id()
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    else:  # pragma: no cover - not Linux
        os.setpriority(os.PRIO_PROCESS, tid, 19)


def job_priority(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Ray Data ``map_batches`` function (or generator): called with ``priority="idle"`` (``fn_kwargs``;
    ``normal``: as it is), its work runs in this process's idle-priority thread, and it returns, yields or raises
    what ``fn`` does."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def each_at_priority(*args: Any, priority: CpuPriority = "normal", **kwargs: Any) -> Iterator[Any]:
            items = fn(*args, **kwargs)
            yield from items if priority == "normal" else each_at_idle_priority(items)

        return each_at_priority

    @functools.wraps(fn)
    def at_priority(*args: Any, priority: CpuPriority = "normal", **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if priority == "normal" else _idle().submit(fn, *args, **kwargs).result()

    return at_priority


def each_at_idle_priority(items: Iterator[T]) -> Iterator[T]:
    """``items``, each one made in this process's idle-priority thread (so are the threads its first ``next``
    starts: Ray Data's executor, when ``items`` is a dataset's iterator)."""
    done = object()
    while (item := _idle().submit(next, items, done).result()) is not done:
        yield item  # type: ignore[misc]


class _IdleThread:
    """One daemon thread under ``SCHED_IDLE`` that runs what is submitted, in order. A daemon, unlike a
    ``ThreadPoolExecutor``'s workers (joined at exit): an interrupted job's process exits without waiting for it."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]]
        self._work = queue.SimpleQueue()
        threading.Thread(target=self._run, name="vtp-idle", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._work.put((fn, args, kwargs, future))
        return future

    def _run(self) -> None:
        lower_this_thread()
        while True:
            fn, args, kwargs, future = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller, whatever it is
                    future.set_exception(e)


@functools.cache
def _idle() -> _IdleThread:
    return _IdleThread()
