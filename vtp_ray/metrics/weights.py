"""Where metric network weights come from (local files only, never a download), and random ones for tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["INCEPTION_ENV", "LPIPS_ENV", "MissingWeightsError", "resolve_weights"]

INCEPTION_ENV = "VTP_INCEPTION_WEIGHTS"
LPIPS_ENV = "VTP_LPIPS_WEIGHTS"


class MissingWeightsError(FileNotFoundError):
    """A metric's network weights were asked for but the file is not there."""


def resolve_weights(path: str | os.PathLike[str] | None, env: str, what: str, flag: str) -> Path | None:
    """The weights file from ``path``, else from the environment variable ``env``; ``None`` if neither is set.

    Raises ``MissingWeightsError`` (naming the flag and variable) when a path is set but is not a file.
    """
    chosen = path or os.environ.get(env)
    if not chosen:
        return None
    resolved = Path(chosen).expanduser().resolve()
    if not resolved.is_file():
        raise MissingWeightsError(f"{what} weights {str(chosen)!r} (from {flag or env}) is not a file")
    return resolved


def randomize(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every tensor of ``net`` with seeded random values scaled so activations stay O(1); its state dict.

    Convolutions and linear layers: He-normal weights, small biases; batch norms: random affine and running
    statistics near 0 / 1. Works on a module made with ``to_empty`` (nothing is read before it is written).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.01, generator=generator)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.num_batches_tracked.zero_()
    return net.state_dict()
