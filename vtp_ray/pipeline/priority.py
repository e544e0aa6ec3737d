"""A job's CPU priority beside a serving app: the app's processes get the cores first.

On a Serve app's cluster (``PipelineSpec.serve``) a job's preprocess tasks, model stage and Ray Data's executor
on the driver share the nodes' cores with the app's proxy, ingress and model replicas. The model replicas already take
the job's inputs only when no online request waits; ``PipelineSpec.cpu_priority`` does the same for the CPU:

- ``low`` (the default on an app): niceness ``LOW_NICENESS`` (19). Ray starts every worker, the app's included, at
  niceness 15 (``RAY_worker_niceness``), so an app thread weighs 2.4 of the job's under contention;
- ``idle``: Linux's ``SCHED_IDLE``, only the CPU other work leaves (weight 3 against a niceness-15 thread's 36).
  Under a load that saturates the CPU, the job's preprocessing then nearly stops, and with it the model time that
  ``batch_min_share`` promises (measured: 0.03 of the model time against 0.10 at ``low``);
- ``normal``: as Ray runs them.

Linux keeps niceness and policy per thread, and an unprivileged thread cannot raise either back. So the job's work runs
in a thread of its own (``job_priority``, ``each_at_priority``) while a Ray worker's main thread keeps its priority:
the worker serves any later task unchanged, and the job needs no worker processes of its own (which would add to its
start-up). On the driver, Ray Data's executor is started from such a thread: a driver started from a shell runs at
niceness 0, which would outrank every Ray worker, the app's included. The driver's own thread keeps its priority.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Literal, TypeVar, get_args

__all__ = ["CPU_PRIORITIES", "LOW_NICENESS", "CpuPriority", "each_at_priority", "job_priority", "lower_this_thread"]

T = TypeVar("T")
CpuPriority = Literal["idle", "low", "normal"]
CPU_PRIORITIES: tuple[CpuPriority, ...] = get_args(CpuPriority)
#: ``low``'s niceness: Ray starts its workers at 15 (``RAY_worker_niceness``), a 2.4:1 weight above this.
LOW_NICENESS = 19


def lower_this_thread(priority: CpuPriority) -> None:
    """Run the calling thread (and the threads it starts from now on) at ``priority``: ``idle`` is ``SCHED_IDLE``
    (where the platform has no such policy, ``low``), ``low`` niceness ``LOW_NICENESS``, ``normal`` unchanged."""
    tid = threading.get_native_id()
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    elif priority != "normal" and os.getpriority(os.PRIO_PROCESS, tid) < LOW_NICENESS:
        os.setpriority(os.PRIO_PROCESS, tid, LOW_NICENESS)


def job_priority(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Ray Data ``map_batches`` function (or generator): called with ``priority="low"`` or ``"idle"``
    (``fn_kwargs``; ``normal``: as it is), its work runs in this process's thread at that priority, and it returns,
    yields or raises what ``fn`` does."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def items_at_priority(*args: Any, priority: CpuPriority = "normal", **kwargs: Any) -> Iterator[Any]:
            yield from each_at_priority(fn(*args, **kwargs), priority)

        return items_at_priority

    @functools.wraps(fn)
    def at_priority(*args: Any, priority: CpuPriority = "normal", **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if priority == "normal" else _lowered(priority).submit(fn, *args, **kwargs).result()

    return at_priority


def each_at_priority(items: Iterator[T], priority: CpuPriority) -> Iterator[T]:
    """``items``, each one made in this process's thread at ``priority`` (so are the threads its first ``next``
    starts: Ray Data's executor, when ``items`` is a dataset's iterator); ``normal``: as they come."""
    if priority == "normal":
        yield from items
        return
    done = object()
    while (item := _lowered(priority).submit(next, items, done).result()) is not done:
        yield item  # type: ignore[misc]


class _LoweredThread:
    """One daemon thread at a lowered priority that runs what is submitted, in order. A daemon, unlike a
    ``ThreadPoolExecutor``'s workers (joined at exit): an interrupted job's process exits without waiting for it."""

    def __init__(self, priority: CpuPriority) -> None:
        self._priority = priority
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Future[Any]]]
        self._work = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"vtp-{priority}", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._work.put((fn, args, kwargs, future))
        return future

    def _run(self) -> None:
        lower_this_thread(self._priority)
        while True:
            fn, args, kwargs, future = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller, whatever it is
                    future.set_exception(e)


@functools.cache
def _lowered(priority: CpuPriority) -> _LoweredThread:
    return _LoweredThread(priority)
