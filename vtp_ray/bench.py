"""Latency and throughput of the replica's verbs, plus the model's FLOP count and the device's own GEMM rate to put
them against; with ``compile``, eager and compiled replicas side by side."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .device import resolve_precision, synchronize
from .model import VTPConfig
from .replica import VTPReplica
from .words import plural

VERBS = ("encode", "decode", "reconstruct", "embed")
MODES = ("eager", "compiled")
LONG_S = 10.0  # a bench estimated to take this long or longer says so once its first measurement is timed


def _ffn_macs(kind: str, dim: int, ratio: float) -> int:
    hidden = int(dim * ratio)
    if kind == "mlp":
        return 2 * dim * hidden
    align = int(kind[len("swiglu") :] or 8)
    d = int(hidden * 2 / 3)
    return 3 * dim * (d + (-d % align))


def _blocks_macs(tokens: int, dim: int, depth: int, ffn: str, ratio: float) -> int:
    per_token = 4 * dim * dim + _ffn_macs(ffn, dim, ratio)  # qkv + proj + ffn
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return depth * (tokens * per_token + attention)


def model_flops(cfg: VTPConfig, height: int = 256, width: int = 256) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one image through the encoder trunk and the pixel decoder."""
    p = cfg.vision_patch_size
    n = (height // p) * (width // p)
    d, c, dd = cfg.vision_embed_dim, cfg.vision_feature_bottleneck, cfg.decoder_embed_dim
    encode = n * d * 3 * p * p + _blocks_macs(n + 1, d, cfg.vision_depth, cfg.vision_ffn_layer, cfg.vision_mlp_ratio)
    encode += n * d * c
    decode = n * c * dd + _blocks_macs(n, dd, cfg.decoder_depth, cfg.decoder_ffn_layer, 4.0) + n * dd * 3 * 16 * 16
    return {"encode": 2.0 * encode, "decode": 2.0 * decode}


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, n: int | None = None, runs: int = 5) -> float:
    """The device's matrix-multiply rate in ``dtype``: the best of ``runs`` square products of side ``n`` (default:
    8192 on an accelerator, large enough to reach its matrix engine's rate; 1024 on the CPU, seconds rather than
    minutes where bf16 is emulated)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    time_call(lambda: a @ b, device, warmup=1, runs=1)  # warm: the first product picks its kernel
    return 2.0 * n**3 / min(time_call(lambda: a @ b, device, warmup=0, runs=1) for _ in range(runs))


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, runs: int = 5) -> float:
    """Median seconds of ``runs`` calls after ``warmup`` calls, synchronizing the device around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def duration(seconds: float) -> str:
    """``seconds`` the way a person says it: ``40 s``, ``7 min``, ``1 h 5 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class BenchProgress:
    """What ``bench`` tells while it runs, through ``write``: the plan when the first replica is loaded, an estimate
    of the whole once the first measurement (a precision, mode, batch size and verb) is timed (when that is
    ``LONG_S`` or longer), then before each measurement ``i/n`` and about how long is left.

    A measurement's time is taken as its FLOPs (``calls`` calls of the verb on the batch) times the seconds per FLOP
    seen so far at its precision and mode (else at the same precision eager, else the latest seen). Only whole
    measurements count: their warm-up calls make them representative, while a replica's very first call can take
    ten times a warm one. The estimate is refreshed after every measurement."""

    def __init__(
        self,
        write: Callable[[str], None],
        precisions: Sequence[str],
        modes: Sequence[str],
        batch_sizes: Sequence[int],
        verbs: Sequence[str],
        warmup: int,
        runs: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.calls, self.warmup, self.clock = write, warmup + runs, warmup, clock
        self.shape = (len(precisions), len(modes), len(batch_sizes), len(verbs))
        self.left = [(p, m, b, v) for p in precisions for m in modes for b in batch_sizes for v in verbs]
        self.total, self.index = len(self.left), 0
        self.flops: dict[str, float] = {}
        self.seen: dict[tuple[str, str], list[float]] = {}  # (precision, mode) -> [seconds, flops]
        self.latest: float | None = None  # seconds per FLOP, last seen
        self.started = self.measure_start = clock()

    def plan(self, flops: dict[str, float], device: str, size: int) -> None:
        """A replica is loaded: its model's FLOPs per image (``model_flops``), its device and the image size."""
        first = not self.flops
        self.flops = {
            "encode": flops["encode"],
            "decode": flops["decode"],
            "reconstruct": flops["encode"] + flops["decode"],
            "embed": flops["encode"],
        }
        if not first:
            return
        precisions, modes, batches, verbs = self.shape
        plan = [plural(precisions, "precision")] + ["2 modes (eager, compiled)"] * (modes > 1)
        plan += [plural(batches, "batch size"), plural(verbs, "verb")]
        plan.append(f"{plural(self.calls, 'call')} ({self.warmup} warm-up + {self.calls - self.warmup} timed)")
        self.write(
            f"bench: {plural(self.total, 'measurement')}: {' x '.join(plan)} at {size} px on {device}; "
            "time estimates follow the first measurement"
        )

    def start(self, key: tuple[str, str, int, str]) -> None:
        """Measurement ``key`` (precision, mode, batch, verb) begins."""
        self.index += 1
        self.measure_start = self.clock()
        precision, mode, batch, verb = key
        line = f"bench {self.index}/{self.total}: {precision} {mode} batch {batch} {verb}"
        if self.latest is not None:
            left = self._left()
            line += f"; {duration(self.measure_start - self.started)} so far, "
            line += f"about {duration(left)} left" if left >= 1 else "under a second left"
        self.write(line)

    def done(self, key: tuple[str, str, int, str]) -> None:
        """Measurement ``key`` ended."""
        now = self.clock()
        first = self.latest is None
        self.left.remove(key)
        seen = self.seen.setdefault(key[:2], [0.0, 0.0])
        seen[0] += now - self.measure_start
        seen[1] += self._flops(key)
        self.latest = seen[0] / seen[1]
        whole = now - self.started + self._left() if first else 0.0
        if whole >= LONG_S:
            line = (
                f"bench: about {duration(whole)} in all (the first measurement, {plural(self.calls, 'call')}, "
                f"took {now - self.measure_start:.1f} s)"
            )
            if whole >= 120:
                line += "; quicker: fewer --batch-sizes, --precisions or --verbs, or smaller --warmup, --runs or --size"
            self.write(line)

    def skip(self, precision: str, mode: str) -> None:
        """The measurements of ``precision`` and ``mode`` will not run (a replica that stayed eager)."""
        kept = [key for key in self.left if key[:2] != (precision, mode)]
        self.total -= len(self.left) - len(kept)
        self.left = kept

    def finish(self) -> None:
        self.write(f"bench: {plural(self.index, 'measurement')} in {duration(self.clock() - self.started)}")

    def _flops(self, key: tuple[str, str, int, str]) -> float:
        return key[2] * self.flops[key[3]] * self.calls

    def _rate(self, mode: tuple[str, str]) -> float:
        for known in (mode, (mode[0], "eager")):
            if known in self.seen:
                return self.seen[known][0] / self.seen[known][1]
        return self.latest or 0.0

    def _left(self) -> float:
        return sum(self._flops(key) * self._rate(key[:2]) for key in self.left)


@dataclass
class BenchRow:
    precision: str
    batch: int
    verb: str
    seconds: float
    flops_per_image: float
    random_weights: bool = False
    compiled: bool = False
    speedup: float | None = None  # a compiled row: the eager row's time over this one's
    gemm_gflops: float | None = None  # the device's GEMM rate at this precision (``gemm_flops_per_s``)

    @property
    def ms_per_batch(self) -> float:
        return self.seconds * 1e3

    @property
    def ms_per_image(self) -> float:
        return self.seconds * 1e3 / self.batch

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def gflops(self) -> float:
        return self.flops_per_image * self.images_per_s / 1e9

    @property
    def of_gemm(self) -> float | None:
        """The model's FLOP rate as a fraction of the device's GEMM rate at this precision."""
        return self.gflops / self.gemm_gflops if self.gemm_gflops else None

    def to_dict(self) -> dict[str, Any]:
        derived = {"ms_per_image": self.ms_per_image, "images_per_s": self.images_per_s, "of_gemm": self.of_gemm}
        return {**dataclasses.asdict(self), **derived}


def bench(
    model: str,
    device: str = "auto",
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 8),
    size: int = 256,
    verbs: Sequence[str] = VERBS,
    warmup: int = 3,
    runs: int = 5,
    compile: str = "off",
    compile_cache: str | None = None,
    progress: Callable[[str], None] | None = None,
    cuda_graphs: bool = True,
) -> list[BenchRow]:
    """Time each verb of a ``VTPReplica`` per precision and batch size on seeded random images; with ``compile``
    ``on`` / ``auto``, a compiled replica's rows follow the eager ones (once its graphs are compiled). Each row
    carries the device's GEMM rate at its precision, measured before that precision's first row. On CUDA both
    replicas replay batches of up to the largest batch size as CUDA graphs unless ``cuda_graphs`` is False.

    ``progress`` is given lines to show (the CLI writes them to stderr): the plan, an estimate of its time once the
    first measurement is timed, and before each measurement which one it is and about how long is left
    (``BenchProgress``)."""
    if unknown := [verb for verb in verbs if verb not in VERBS]:
        raise ValueError(f"unknown verbs {unknown}: choose from {', '.join(VERBS)}")
    modes = MODES if compile != "off" else MODES[:1]
    tracker = BenchProgress(progress or (lambda line: None), precisions, modes, batch_sizes, verbs, warmup, runs)
    rows: list[BenchRow] = []
    for precision in precisions:
        replica = VTPReplica(
            model,
            device=device,
            precision=precision,
            warmup_size=0,
            compile_max_batch=max(batch_sizes),
            cuda_graphs=cuda_graphs,
        )
        tracker.plan(model_flops(replica.model.config, size, size), str(replica.device), size)
        if replica.graph_status().enabled:
            tracker.write(f"bench: CUDA graphs on: batches of up to {max(batch_sizes)} replay recorded graphs")
        gemm = gemm_flops_per_s(replica.device, resolve_precision(precision)) / 1e9
        tracker.write(f"bench: {precision} GEMM rate on {replica.device}: {gemm:,.0f} GFLOP/s")
        eager = [
            dataclasses.replace(row, gemm_gflops=gemm)
            for batch in batch_sizes
            for row in _bench_batch(replica, batch, size, verbs, warmup, runs, tracker)
        ]
        rows += eager
        del replica
        if compile == "off":
            continue
        tracker.write(f"bench: building the compiled {precision} replica (its compile time is not in the estimate)")
        replica = VTPReplica(
            model,
            device=device,
            precision=precision,
            warmup_size=size,
            compile=compile,
            compile_cache=compile_cache,
            compile_max_batch=max(batch_sizes),
            cuda_graphs=cuda_graphs,
        )
        if not replica.compile_status().compiled:
            tracker.skip(precision, "compiled")
            continue  # eager (the replica logged why): the rows above are its rows
        replica.wait_compiled()
        for batch in batch_sizes:
            for row in _bench_batch(replica, batch, size, verbs, warmup, runs, tracker, mode="compiled"):
                before = next(r for r in eager if (r.batch, r.verb) == (row.batch, row.verb))
                rows.append(
                    dataclasses.replace(row, compiled=True, speedup=before.seconds / row.seconds, gemm_gflops=gemm)
                )
    tracker.finish()
    return rows


def _bench_batch(
    replica: VTPReplica,
    batch: int,
    size: int,
    verbs: Sequence[str],
    warmup: int,
    runs: int,
    tracker: BenchProgress,
    mode: str = "eager",
) -> list[BenchRow]:
    flops = model_flops(replica.model.config, size, size)
    images = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    latents = replica.encode(images).latents
    calls = {
        "encode": (lambda: replica.encode(images), flops["encode"]),
        "decode": (lambda: replica.decode(latents), flops["decode"]),
        "reconstruct": (lambda: replica.reconstruct(images), flops["encode"] + flops["decode"]),
        "embed": (lambda: replica.embed(images), flops["encode"]),
    }
    rows = []
    for verb in verbs:
        call, verb_flops = calls[verb]
        key = (replica.info.precision, mode, batch, verb)
        tracker.start(key)
        seconds = time_call(call, replica.device, warmup, runs)
        tracker.done(key)
        rows.append(BenchRow(replica.info.precision, batch, verb, seconds, verb_flops, replica.info.random_weights))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    header = (
        f"{'precision':<10}{'mode':<9}{'batch':>6}  {'verb':<12}{'ms/batch':>10}{'ms/image':>10}{'images/s':>10}"
        f"{'GFLOP/s':>9}{'of GEMM':>9}{'speedup':>9}"
    )
    lines = [header]
    for r in rows:
        speedup = f"{r.speedup:>8.2f}x" if r.speedup else " " * 9
        of_gemm = f"{r.of_gemm:>8.1%}" if r.of_gemm is not None else " " * 8
        lines.append(
            f"{r.precision:<10}{'compiled' if r.compiled else 'eager':<9}{r.batch:>6}  {r.verb:<12}"
            f"{r.ms_per_batch:>10.1f}{r.ms_per_image:>10.1f}{r.images_per_s:>10.2f}{r.gflops:>9.0f} {of_gemm}{speedup}"
            + ("  (random weights)" if r.random_weights else "")
        )
    return "\n".join(lines)
