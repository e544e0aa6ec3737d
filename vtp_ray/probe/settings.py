"""The linear probe's protocol as one frozen value: its numbers, its heads and its learning-rate schedule (no torch).

Upstream VTP's ``tools/test_linear_probing_hf.py`` (DINOv2's protocol): the trunk frozen; the features of an image
are the class tokens of its last ``n`` blocks, concatenated, then the mean of the last block's patch tokens, all
after the trunk's final norm; one linear head per ``(n, learning rate)``, every head trained on the same batches
(SGD with momentum, no weight decay, the learning rate scaled by global batch / 256 and annealed to 0 on a cosine
over ``epochs x epoch_length`` iterations), evaluated on the validation set after every epoch. The defaults here are
upstream's; every number is a field (and a flag of ``vtp-ray eval --task linear-probe``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..images import PATCH_SIZE
from ..options import check_precision

__all__ = [
    "MODES",
    "UPSTREAM_LEARNING_RATES",
    "Head",
    "ProbeSettings",
    "cosine_factor",
]

#: Upstream's grid: 13 base learning rates, before the batch scaling.
UPSTREAM_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
#: ``protocol``: upstream's (a trunk pass per augmented training image); ``fast``: the features of every image are
#: extracted once, without augmentation, and the heads trained on them (not upstream's protocol).
MODES = ("protocol", "fast")
ProbeMode = Literal["protocol", "fast"]


def cosine_factor(iteration: int, total: int) -> float:
    """The learning rate's factor at ``iteration`` (0-based) of ``total``: ``(1 + cos(pi t / T)) / 2``, what
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total, eta_min=0)`` gives after ``iteration`` steps."""
    return 0.5 * (1.0 + math.cos(math.pi * iteration / total))


@dataclass(frozen=True)
class Head:
    """One linear classifier: its name (upstream's, e.g. ``classifier_4_blocks_avgpool_True_lr_0_00400``), the
    blocks whose class tokens it reads, and its learning rate before and after the batch scaling."""

    name: str
    n_last_blocks: int
    base_lr: float
    lr: float


@dataclass(frozen=True)
class ProbeSettings:
    """The protocol's numbers (upstream's by default).

    Args:
        epochs, epoch_length: training is ``epochs x epoch_length`` iterations; the heads are evaluated on the
            validation set and checkpointed after each epoch. An epoch is a number of iterations, not a pass over
            the training set: the training stream is an endless sequence of passes, each in a fresh random order.
        batch_size: images per worker and iteration (the global batch is ``batch_size x workers``); validation
            batches are twice as large, as upstream's.
        learning_rates: base learning rates; each head's is ``base x global batch / 256``.
        n_last_blocks: the ``n`` of the heads (each with every learning rate).
        momentum, weight_decay: SGD's.
        init_std: the heads' weights start as N(0, init_std); their biases at 0.
        size: the side of the square training crop and validation crop (a multiple of 16).
        resize_size: validation images are resized (short side, bicubic) to this, then center-cropped to ``size``.
        crop_scale, crop_ratio: RandomResizedCrop's ranges of area fraction and aspect ratio.
        seed: the heads' initialization, the order of the training passes and the augmentation draws.
        shuffle_buffer: shards and parquet files are shuffled whole, per pass; their samples are mixed across files
            by a buffer of this many rows in each worker (image folders are shuffled image by image instead).
        log_every: iterations between progress lines.
        mode: ``protocol`` (upstream's) or ``fast`` (features extracted once, no augmentation: not upstream's).
        precision: the trunk's: ``auto`` is bf16 where the device multiplies bf16 natively (upstream runs the trunk
            under bf16 autocast), else fp32; ``fp32`` / ``bf16`` / ``fp16`` force it. bf16 is the replica's own
            (matmul weights in bf16; norms, RoPE and the residual stream in float32). The heads are float32.
    """

    epochs: int = 10
    epoch_length: int = 1250
    batch_size: int = 128
    learning_rates: tuple[float, ...] = UPSTREAM_LEARNING_RATES
    n_last_blocks: tuple[int, ...] = (1, 4)
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_std: float = 0.01
    size: int = 224
    resize_size: int = 256
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    shuffle_buffer: int = 1024
    log_every: int = 50
    mode: ProbeMode = "protocol"
    precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "epoch_length", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rates or any(not lr > 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates must be positive numbers, got {list(self.learning_rates)}")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise ValueError(f"learning_rates repeat a value: {list(self.learning_rates)}")
        if not self.n_last_blocks or any(n < 1 for n in self.n_last_blocks):
            raise ValueError(f"n_last_blocks must be positive, got {list(self.n_last_blocks)}")
        if len(set(self.n_last_blocks)) != len(self.n_last_blocks):
            raise ValueError(f"n_last_blocks repeat a value: {list(self.n_last_blocks)}")
        if self.size <= 0 or self.size % PATCH_SIZE:
            raise ValueError(f"size must be a positive multiple of {PATCH_SIZE}, got {self.size}")
        if self.resize_size < self.size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= size ({self.size})")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.init_std < 0:
            raise ValueError("momentum must be in [0, 1), weight_decay and init_std >= 0")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.precision != "auto":
            check_precision(self.precision)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")

    @property
    def max_blocks(self) -> int:
        """The class tokens the features hold: those of the last ``max(n_last_blocks)`` blocks."""
        return max(self.n_last_blocks)

    @property
    def iterations(self) -> int:
        return self.epochs * self.epoch_length

    def global_batch(self, workers: int) -> int:
        return self.batch_size * workers

    def heads(self, workers: int) -> list[Head]:
        """Every head, in upstream's order (by ``n``, then learning rate), with its scaled learning rate."""
        scale = self.global_batch(workers) / 256.0
        pairs = [(n, lr, lr * scale) for n in self.n_last_blocks for lr in self.learning_rates]
        names = [_head_name(n, scaled, 5) for n, _, scaled in pairs]
        if len(set(names)) < len(names):  # upstream's 5 decimals collapse small scaled rates: more digits
            names = [_head_name(n, scaled, None) for n, _, scaled in pairs]
        return [Head(name, n, lr, scaled) for name, (n, lr, scaled) in zip(names, pairs, strict=True)]

    def feature_dim(self, embed_dim: int) -> int:
        """Width of the stored feature vector: ``max_blocks`` class tokens and the patch-token mean."""
        return (self.max_blocks + 1) * embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_digest(self) -> str:
        """What a checkpoint must match to be resumed: everything that shapes the heads' training."""
        fields = self.to_dict()
        fields.pop("log_every")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _head_name(n: int, lr: float, decimals: int | None) -> str:
    text = f"{lr:.{decimals}f}" if decimals is not None else f"{lr:.6e}"
    return f"classifier_{n}_blocks_avgpool_True_lr_{text}".replace(".", "_").replace("-", "m").replace("+", "p")
