"""Latency and throughput of the replica's verbs, plus the model's FLOP count to put them against; with ``compile``,
eager and compiled replicas side by side."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .device import synchronize
from .model import VTPConfig
from .replica import VTPReplica

VERBS = ("encode", "decode", "reconstruct", "embed")


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

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ms_per_image": self.ms_per_image, "images_per_s": self.images_per_s}


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
) -> list[BenchRow]:
    """Time each verb of a ``VTPReplica`` per precision and batch size on seeded random images; with ``compile``
    ``on`` / ``auto``, a compiled replica's rows follow the eager ones (once its graphs are compiled)."""
    if unknown := [verb for verb in verbs if verb not in VERBS]:
        raise ValueError(f"unknown verbs {unknown}: choose from {', '.join(VERBS)}")
    rows: list[BenchRow] = []
    for precision in precisions:
        replica = VTPReplica(model, device=device, precision=precision, warmup_size=0)
        eager = [row for batch in batch_sizes for row in _bench_batch(replica, batch, size, verbs, warmup, runs)]
        rows += eager
        del replica
        if compile == "off":
            continue
        replica = VTPReplica(
            model,
            device=device,
            precision=precision,
            warmup_size=size,
            compile=compile,
            compile_cache=compile_cache,
            compile_max_batch=max(batch_sizes),
        )
        if not replica.compile_status().compiled:
            continue  # eager (the replica logged why): the rows above are its rows
        replica.wait_compiled()
        for batch in batch_sizes:
            for row in _bench_batch(replica, batch, size, verbs, warmup, runs):
                before = next(r for r in eager if (r.batch, r.verb) == (row.batch, row.verb))
                rows.append(dataclasses.replace(row, compiled=True, speedup=before.seconds / row.seconds))
    return rows


def _bench_batch(
    replica: VTPReplica, batch: int, size: int, verbs: Sequence[str], warmup: int, runs: int
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
        seconds = time_call(call, replica.device, warmup, runs)
        rows.append(BenchRow(replica.info.precision, batch, verb, seconds, verb_flops, replica.info.random_weights))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    header = (
        f"{'precision':<10}{'mode':<9}{'batch':>6}  {'verb':<12}{'ms/batch':>10}{'ms/image':>10}{'images/s':>10}"
        f"{'GFLOP/s':>9}{'speedup':>9}"
    )
    lines = [header]
    for r in rows:
        speedup = f"{r.speedup:>8.2f}x" if r.speedup else " " * 9
        lines.append(
            f"{r.precision:<10}{'compiled' if r.compiled else 'eager':<9}{r.batch:>6}  {r.verb:<12}"
            f"{r.ms_per_batch:>10.1f}{r.ms_per_image:>10.1f}{r.images_per_s:>10.2f}{r.gflops:>9.0f}{speedup}"
            + ("  (random weights)" if r.random_weights else "")
        )
    return "\n".join(lines)
