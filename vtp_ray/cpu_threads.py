"""``cpu_threads="auto"``: a CPU replica keeps only the torch threads that pay for themselves.

A replica's intra-op threads meet at a barrier after every parallel op. Where ops are small (a small model, small
images), a second thread buys little even on idle cores, and on a node it shares with the Serve proxy, the ingress
and a job's decoding it costs a great deal: a team thread that the OS preempted holds up every barrier. The tiny
test model's calls of 8 images took 2.0 ms on two threads and 1.5 ms on one, on idle cores. Beside an online load
and a job on the same two cores, one thread made its model calls 2-3x shorter, and the job beside the load ran
3.1-3.4x as fast at the same request rate (docs/results.md, SF20). VTP-Small at 256 px is the other case: its
matmuls are large, so two threads make a call 1.6x faster and stay faster under the same load.

So at warm-up the replica times one model call at its thread count and at fewer (halving down to one, or to the
first count out of the margin: where ops are large, fewer threads only take longer). It keeps the fewest threads
whose call is within ``WITHIN`` of the fastest. This is measured only where a one-image call at the full count is
shorter than ``TUNE_BELOW_S``: there the ops are small enough for a barrier to matter, and the timing costs little.
Longer calls keep every thread without trying fewer.

A job's own CPU replicas (``vtp-ray tokenize`` without ``--serve-app``) start from the node's cores and tune the
same way: there the job's decoding shares the cores, and the tiny model's replica spent 0.27 ms of CPU per image on
two threads against 0.19 ms on one (docs/results.md, D12).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Literal

__all__ = [
    "TUNE_BATCH", "TUNE_BELOW_S", "WITHIN", "CpuThreads", "candidates", "check_cpu_threads", "fewest_threads",
    "node_cores", "tune",
]  # fmt: skip

#: A replica's ``cpu_threads``: a number, ``auto`` (``tune`` at warm-up), or None (torch's choice, or the job's).
CpuThreads = int | Literal["auto"] | None

#: Threads that buy less than this (a fraction of the call's time) are not kept. Generous, because the timing runs
#: on idle cores and a shared node's cost does not show there: the tiny model's calls of 8 were within 10% either
#: way on idle cores and 2.4-2.8x longer on two threads beside an online load.
WITHIN = 0.25
#: Fewer threads are tried only where a one-image call at the full count takes under this.
TUNE_BELOW_S = 0.05
#: Images per timed call: the Serve app's default ``max_batch_size``, a typical call.
TUNE_BATCH = 8
#: Timed calls per thread count (after one untimed call); the fastest counts.
REPEATS = 3


def check_cpu_threads(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a ``CpuThreads``: a positive int, ``auto`` or None."""
    if not (value in (None, "auto") or (type(value) is int and value >= 1)):
        raise ValueError(f"cpu_threads must be a positive int, 'auto' or None, got {value!r}")


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of the machine's where that is not known)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def candidates(most: int) -> list[int]:
    """``most`` and then halvings of it down to 1: ``8 -> [8, 4, 2, 1]``, ``6 -> [6, 3, 1]``."""
    counts = [most]
    while counts[-1] > 1:
        counts.append(max(1, counts[-1] // 2))
    return counts


def fewest_threads(timings: Mapping[int, float], within: float = WITHIN) -> int:
    """The fewest threads whose time is within ``within`` of the fastest."""
    fastest = min(timings.values())
    return min(n for n, seconds in timings.items() if seconds <= fastest * (1 + within))


def tune(
    call: Callable[[int], None], set_threads: Callable[[int], None], most: int, repeats: int = REPEATS
) -> dict[int, float]:
    """Time ``call(batch)`` at ``most`` threads (the count set, ``call`` warmed up at it) and fewer, leave the chosen
    count set (``fewest_threads``), and return the seconds per call by thread count. Only ``most`` is timed (at batch
    1) where that is ``TUNE_BELOW_S`` or longer, once where it is twice that: a large model's start pays one call.
    Halving stops at the first count out of the margin of the fastest so far (on a node of many cores a large
    model's calls on one thread would take seconds each)."""

    def timed(batch: int) -> float:
        started = time.perf_counter()
        call(batch)
        return time.perf_counter() - started

    def fastest(threads: int, batch: int) -> float:
        set_threads(threads)
        call(batch)  # untimed: the thread team resizes, kernels are picked
        return min(timed(batch) for _ in range(repeats))

    if most <= 1:
        return {}
    one_image = [timed(1)]  # at ``most``, already warm: no untimed call
    if one_image[0] < 2 * TUNE_BELOW_S:
        one_image += [timed(1) for _ in range(repeats - 1)]
    if min(one_image) >= TUNE_BELOW_S:
        return {}  # (``most`` is still set)
    timings: dict[int, float] = {}
    for threads in candidates(most):
        timings[threads] = fastest(threads, TUNE_BATCH)
        if timings[threads] > min(timings.values()) * (1 + WITHIN):
            break  # out of the margin: fewer threads still take longer where ops are large, and each call is longer
    set_threads(fewest_threads(timings))
    return timings
