"""The probe's torch side: the features of a frozen trunk, the linear heads, and one training step of them all.

``probe_features`` is upstream's ``create_linear_input`` for the largest ``n`` at once: the class tokens of the last
``max_blocks`` blocks (earliest first) and the mean of the last block's patch tokens, after the trunk's norm. A
head reading ``n`` blocks takes the last ``(n + 1) x D`` values of that vector, which are exactly its own input
(the class tokens of the last ``n`` blocks, then the patch mean), so one trunk pass feeds every head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import VTPModel
from ..normalize import normalize
from .settings import Head, ProbeSettings, cosine_factor

__all__ = ["LinearHeads", "count_correct", "make_optimizer", "make_schedule", "probe_features", "train_step"]


@torch.no_grad()
def probe_features(model: VTPModel, images: Tensor, max_blocks: int) -> Tensor:
    """uint8 ``(B, H, W, 3)`` on the model's device -> float32 ``(B, (max_blocks + 1) x D)``."""
    outputs = model.get_intermediate_layers_feature(normalize(images), n=max_blocks, return_class_token=True)
    classes = [cls for _, cls in outputs]
    mean = outputs[-1][0].mean(dim=1)
    return torch.cat([*classes, mean], dim=-1).float()


class LinearHeads(nn.Module):
    """One ``nn.Linear`` per head, each reading its part of the feature vector; the forward returns every head's
    logits, in the order of ``heads``.

    Weights start as N(0, ``init_std``) drawn from a generator seeded with ``seed`` (every worker builds the same
    heads), biases at 0.
    """

    def __init__(
        self, heads: Sequence[Head], embed_dim: int, num_classes: int, init_std: float = 0.01, seed: int = 0
    ) -> None:
        super().__init__()
        self.names = [head.name for head in heads]
        self.widths = [(head.n_last_blocks + 1) * embed_dim for head in heads]
        self.linears = nn.ModuleList(nn.Linear(width, num_classes) for width in self.widths)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in self.linears:
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * init_std)
                linear.bias.zero_()

    def forward(self, features: Tensor) -> list[Tensor]:
        return [linear(features[:, -width:]) for linear, width in zip(self.linears, self.widths, strict=True)]


def make_optimizer(heads: LinearHeads, specs: Sequence[Head], settings: ProbeSettings) -> torch.optim.SGD:
    """SGD with one parameter group per head at its scaled learning rate (upstream's)."""
    groups = [
        {"params": list(linear.parameters()), "lr": spec.lr} for linear, spec in zip(heads.linears, specs, strict=True)
    ]
    return torch.optim.SGD(groups, lr=specs[0].lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The cosine annealing to 0 over ``iterations`` steps (``settings.cosine_factor``), stepped once per step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, iterations))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    features: Tensor,
    targets: Tensor,
    scale: float | Tensor | None = None,
) -> Tensor:
    """One step of every head on one batch: the sum over the heads of their cross-entropies summed over the batch
    times ``scale``, backward, SGD, then the schedule. ``scale`` defaults to ``1 / len(targets)`` (each head's mean
    loss, upstream's); under DDP, which averages the workers' gradients, ``workers / images of the global batch``
    gives every head the mean over the whole global batch however its images are spread (a worker whose images
    all failed to load still takes part, with zeros). Returns the loss (a 0-d tensor: reading it waits for the
    device)."""
    scale = 1.0 / max(len(targets), 1) if scale is None else scale
    loss = sum(F.cross_entropy(out, targets, reduction="sum") for out in model(features)) * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss.detach()


@torch.no_grad()
def count_correct(heads: LinearHeads, features: Tensor, targets: Tensor) -> Tensor:
    """Per head, how many of ``targets`` its top-1 prediction gets right: int64 ``(heads,)``."""
    return torch.stack([(out.argmax(dim=1) == targets).sum() for out in heads(features)])
