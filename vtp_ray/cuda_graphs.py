"""CUDA graphs for a replica's encoder and decoder: small batches at the GPU's rate instead of the launch rate.

At small batches a GPU replica is bound by launching kernels, not by running them: on an H200, VTP-Small's bf16
encoder took 6.9 ms eagerly for one image and 1.05 ms replayed from a CUDA graph (6.5x; 3.6x at 8 images, 1.1x at
64, docs/results.md C6). Inductor's own CUDA graphs (``mode="reduce-overhead"``) are not used: their graph trees
belong to the thread that recorded them, and each replay overwrites the previous call's outputs (C5).

So a replica on CUDA records its own: one graph per unit (encoder, decoder) and exact input shape, for batches of
up to ``max_batch`` images and at most ``max_graphs`` graphs. A shape is recorded on the calling thread at its first
call, once the call underneath is settled for it (eager, or its compiled graph ready or failed): three warm-up calls
on a side stream and the capture, about four calls' time, once. Later calls copy their input into the graph's
input, replay, and return copies of its outputs, so no result is ever overwritten by a later call. Every graph of a
replica draws from one memory pool: replays never overlap (one calling thread) and outputs are copied out at once.

A shape that cannot be recorded (a capture error) runs as before, for good, and says why once; larger batches, other
devices and calls before their shape is settled run as before too. ``status()`` counts all of it, replays of
compiled calls apart (a job's rows say whether they ran compiled).
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

    ``settled(unit, x)`` says how the call underneath runs from now on for ``x``'s shape: ``compiled``, ``eager``,
    or None while that may still change (a compiled replica's shape before its graph is ready or failed; default:
    ``eager``); only a settled shape is recorded, by ``recorder`` (``record``). Call from one thread at a time (a
    replica's torch thread): replays of one graph must not overlap."""

    def __init__(
        self,
        units: dict[str, Unit],
        device: torch.device,
        max_batch: int = 8,
        max_graphs: int = MAX_GRAPHS,
        settled: Callable[[str, Tensor], str | None] | None = None,
        recorder: Callable[[Unit, Tensor, Any], Replay] = record,
    ) -> None:
        if max_batch < 1 or max_graphs < 1:
            raise ValueError(f"max_batch and max_graphs must be >= 1, got {max_batch} and {max_graphs}")
        self.units = units
        self.max_batch, self.max_graphs = max_batch, max_graphs
        self._settled, self._record = settled or (lambda unit, x: "eager"), recorder
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._replays: dict[tuple[str, tuple[int, ...], torch.dtype], tuple[Replay, bool]] = {}  # (call, compiled)
        self._failed: dict[tuple[str, tuple[int, ...], torch.dtype], str] = {}
        self._lock = threading.Lock()  # status() may be read from another thread
        self._replayed = self._replayed_compiled = 0
        self._direct: Counter[str] = Counter()

    def encoder(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """Normalized images (N, 3, H, W) -> (latents, CLIP embedding or None)."""
        return self._call("encoder", image)

    def decoder(self, latents: Tensor) -> Tensor:
        """Latents (N, C, h, w) -> normalized images (N, 3, 16h, 16w)."""
        return self._call("decoder", latents)

    def _call(self, unit: str, x: Tensor) -> Any:
        key = (unit, tuple(x.shape), x.dtype)
        recorded = self._replays.get(key)
        if recorded is None:
            recorded, reason = self._record_or_why(unit, key, x)
            if recorded is None:
                with self._lock:
                    self._direct[reason] += 1
                return self.units[unit](x)
        replay, compiled = recorded
        out = replay(x)
        with self._lock:
            self._replayed += 1
            self._replayed_compiled += compiled
        return out

    def _record_or_why(self, unit: str, key: tuple, x: Tensor) -> tuple[tuple[Replay, bool] | None, str]:
        if len(x) > self.max_batch:
            return None, "large_batch"
        if key in self._failed:
            return None, "failed"
        if len(self._replays) + len(self._failed) >= self.max_graphs:
            return None, "over_cap"
        kind = self._settled(unit, x)
        if kind is None:
            return None, "not_settled"
        try:
            replay = self._record(self.units[unit], x, self._pool)
        except Exception as e:  # this shape runs without a graph for good; the status says why
            with self._lock:
                self._failed[key] = f"{type(e).__name__}: {next(iter(str(e).strip().splitlines()), '')}"
            log.warning("no CUDA graph for %s: %s; such calls run without one", _name(key), self._failed[key])
            return None, "failed"
        recorded = (replay, kind == "compiled")
        with self._lock:
            self._replays[key] = recorded
        log.info("recorded a CUDA graph for %s (%s)", _name(key), kind)
        return recorded, ""

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
                compiled_replays=self._replayed_compiled,
                direct_calls=dict(self._direct),
            )


def _name(key: tuple[str, tuple[int, ...], torch.dtype]) -> str:
    unit, shape, _ = key
    return f"{unit} {'x'.join(map(str, shape))}"
