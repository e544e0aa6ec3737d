"""CUDA graphs for a replica's encoder and decoder: small batches at the GPU's rate instead of the launch rate.

At small batches a GPU replica is bound by launching kernels, not by running them: on an H200, VTP-Small's bf16
encoder took 6.9 ms eagerly for one image and 1.05 ms replayed from a CUDA graph (6.5x; 3.6x at 8 images, 1.1x at
64, docs/results.md C6). Inductor's own CUDA graphs (``mode="reduce-overhead"``) are not used: their graph trees
belong to the thread that recorded them, and each replay overwrites the previous call's outputs (C5).

So a replica on CUDA records its own: one graph per unit (encoder, decoder) and exact input shape, for batches of
up to ``max_batch`` images and at most ``max_graphs`` graphs. A shape is recorded on the calling thread at its first
call, once the call underneath is final for it (eager, or its compiled graph ready or failed): three warm-up calls
on a side stream and the capture, about four calls' time, once. Later calls copy their input into the graph's
input, replay, and return copies of its outputs, so no result is ever overwritten by a later call. Every graph of a
replica draws from one memory pool: replays never overlap (one calling thread) and outputs are copied out at once.

A shape that cannot be recorded (a capture error) runs as before, for good, and says why once; larger batches, other
devices and calls before their shape is final run as before too. ``status()`` counts all of it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .outputs import GraphStatus

log = logging.getLogger(__name__)

__all__ = ["MAX_GRAPHS", "CudaGraphs", "record"]

#: Default graphs per replica: both units at batches 1..8 of one image size.
MAX_GRAPHS = 16
WARMUP_CALLS = 3  # on a side stream before capturing: lazy initialisations must not happen inside the capture

Unit = Callable[[Tensor], Any]  # encoder: (latents, clip or None); decoder: images
Replay = Callable[[Tensor], Any]


def record(unit: Unit, example: Tensor, pool: Any) -> Replay:
    """Record ``unit`` on ``example``'s shape as a CUDA graph drawing from ``pool``; returns the replay call."""
    static_in = example.clone(memory_format=torch.contiguous_format)
    side = torch.cuda.Stream(device=example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            unit(static_in)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a compile thread's own CUDA work meanwhile neither breaks the capture nor is captured
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        static_out = unit(static_in)

    def replay(x: Tensor) -> Any:
        static_in.copy_(x)
        graph.replay()
        if isinstance(static_out, tuple):
            return tuple(None if t is None else t.clone() for t in static_out)
        return static_out.clone()

    return replay


class CudaGraphs:
    """The encoder and decoder ``units`` (eager or compiled) replayed from CUDA graphs where a shape allows.

    ``final(unit, x)`` says whether the call underneath is final for ``x``'s shape (a compiled replica: its graph
    is ready or failed; default: always); only then is the shape recorded. ``recorder`` records one shape
    (``record``). Call from one thread (the replica's torch thread)."""

    def __init__(
        self,
        units: dict[str, Unit],
        device: torch.device,
        max_batch: int = 8,
        max_graphs: int = MAX_GRAPHS,
        final: Callable[[str, Tensor], bool] | None = None,
        recorder: Callable[[Unit, Tensor, Any], Replay] = record,
    ) -> None:
        if max_batch < 1 or max_graphs < 1:
            raise ValueError(f"max_batch and max_graphs must be >= 1, got {max_batch} and {max_graphs}")
        self.units, self.device = units, device
        self.max_batch, self.max_graphs = max_batch, max_graphs
        self._final, self._record = final or (lambda unit, x: True), recorder
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._replays: dict[tuple[str, tuple[int, ...], torch.dtype], Replay] = {}
        self._failed: dict[tuple[str, tuple[int, ...], torch.dtype], str] = {}
        self._lock = threading.Lock()  # status() may be read from another thread
        self._replayed = 0
        self._direct: Counter[str] = Counter()

    def encoder(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """Normalized images (N, 3, H, W) -> (latents, CLIP embedding or None)."""
        return self._call("encoder", image)

    def decoder(self, latents: Tensor) -> Tensor:
        """Latents (N, C, h, w) -> normalized images (N, 3, 16h, 16w)."""
        return self._call("decoder", latents)

    def _call(self, unit: str, x: Tensor) -> Any:
        key = (unit, tuple(x.shape), x.dtype)
        replay = self._replays.get(key)
        if replay is None:
            replay, reason = self._record_or_why(unit, key, x)
            if replay is None:
                with self._lock:
                    self._direct[reason] += 1
                return self.units[unit](x)
        out = replay(x)
        with self._lock:
            self._replayed += 1
        return out

    def _record_or_why(self, unit: str, key: tuple, x: Tensor) -> tuple[Replay | None, str]:
        if len(x) > self.max_batch:
            return None, "large_batch"
        if key in self._failed:
            return None, "failed"
        if len(self._replays) + len(self._failed) >= self.max_graphs:
            return None, "over_cap"
        if not self._final(unit, x):
            return None, "not_final"
        try:
            replay = self._record(self.units[unit], x, self._pool)
        except Exception as e:  # this shape runs without a graph for good; the status says why
            with self._lock:
                self._failed[key] = f"{type(e).__name__}: {next(iter(str(e).strip().splitlines()), '')}"
            log.warning("no CUDA graph for %s: %s; such calls run without one", _name(key), self._failed[key])
            return None, "failed"
        with self._lock:
            self._replays[key] = replay
        log.info("recorded a CUDA graph for %s", _name(key))
        return replay, ""

    def status(self, reason: str) -> GraphStatus:
        with self._lock:
            return GraphStatus(
                enabled=True,
                reason=reason,
                max_batch=self.max_batch,
                max_graphs=self.max_graphs,
                graphs=tuple(sorted(_name(key) for key in self._replays)),
                failed={_name(key): why for key, why in sorted(self._failed.items(), key=lambda kv: _name(kv[0]))},
                replays=self._replayed,
                direct_calls=dict(self._direct),
            )


def _name(key: tuple[str, tuple[int, ...], torch.dtype]) -> str:
    unit, shape, _ = key
    return f"{unit} {'x'.join(map(str, shape))}"
