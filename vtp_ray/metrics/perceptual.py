"""LPIPS v0.1 (Zhang et al. 2018) with local weights: VGG16 trunk, upstream VTP's, or AlexNet.

Upstream's LPIPS (LightningDiT's / taming's) is the ``lpips`` package's ``LPIPS(net="vgg")``: the same heads file
(``vgg.pth``, md5 d507d734...) on torchvision's ImageNet VGG16. This is our own short module on torchvision's
``features``, not the ``lpips`` package (last release 2021): that one gets the trunk's ImageNet weights only by
download (torchvision's deprecated ``pretrained=True``), so using it would mean a random trunk, renamed keys and a
second load. The tests hold this module to the ``lpips`` package on the same weights (within 2e-7 relative).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np

from .pixel import to_unit_nchw
from .weights import randomize

if TYPE_CHECKING:
    import torch

__all__ = ["Lpips", "LpipsNet", "save_random_lpips"]

LpipsNet = Literal["vgg", "alex"]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# trunk -> (torchvision builder, ``features`` indices ending the five compared ReLU maps, their channels).
# vgg: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; alex: relu1 .. relu5.
_NETS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "vgg": ("vgg16", (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
    "alex": ("alexnet", (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
}


def _trunk(net: str) -> torch.nn.Sequential:
    """torchvision's VGG16 / AlexNet ``features`` on the meta device: no memory, no init, as weights come next."""
    import torch
    import torchvision.models

    with torch.device("meta"):
        return getattr(torchvision.models, _NETS[net][0])(weights=None).features


def _split(state: dict[str, torch.Tensor]) -> tuple[LpipsNet, dict[str, torch.Tensor], list[torch.Tensor]]:
    """(trunk name, trunk ``features`` state dict, five head weights) from any key layout that ``Lpips`` accepts."""
    trunk: dict[str, torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        first, _, rest = key.partition(".")
        if first == "features":
            trunk[rest] = value
        elif first == "net" and rest.startswith("slice"):
            trunk[rest.partition(".")[2]] = value  # the lpips package's slices keep torchvision's indices
        elif first[:3] == "lin" and first[3:].isdigit() and key.endswith("weight"):
            heads[int(first[3:])] = value
    channels = tuple(int(heads[k].shape[1]) for k in range(5) if k in heads)
    for net, (_, _, expected) in _NETS.items():
        if channels == expected:
            return net, trunk, [heads[k].reshape(1, -1, 1, 1).float() for k in range(5)]  # type: ignore[return-value]
    raise ValueError(f"no LPIPS heads lin0..lin4 of a VGG16 or AlexNet trunk (channels {channels})")


class Lpips:
    """LPIPS v0.1 from one local state dict file: uint8 image pairs -> per-image distances (float64 numpy).

    The file holds the trunk as torchvision's keys (``features.*``: a whole ``vgg16`` / ``alexnet`` state dict
    works, ``classifier.*`` is ignored) or as the ``lpips`` package's / taming's ``net.slice*.*``, and the five
    heads as ``lin{k}.model.1.weight`` (the ``lpips`` package's ``weights/v0.1/vgg.pth``) or ``lin{k}.weight``.
    So ``{**torch.load("vgg16-397923af.pth"), **torch.load("vgg.pth", map_location="cpu")}`` and the
    ``state_dict()`` of an ``lpips.LPIPS(net="vgg")`` are valid files. The heads' shapes tell the trunk
    (``self.net``: ``"vgg"`` or ``"alex"``); ``net``, when given, must match. Inputs are scaled to [-1, 1] from
    ``uint8 / 255`` as upstream scales its [0, 1] images.
    """

    def __init__(
        self, weights: str | os.PathLike[str], device: str | torch.device = "cpu", net: LpipsNet | None = None
    ) -> None:
        import torch

        found, trunk_state, heads = _split(torch.load(weights, map_location="cpu", weights_only=True))
        if net is not None and net != found:
            raise ValueError(f"{str(weights)!r} holds LPIPS-{found} weights, not LPIPS-{net}")
        trunk = _trunk(found)
        trunk.load_state_dict(trunk_state, assign=True)
        self.net: LpipsNet = found
        self.device = torch.device(device)
        trunk = trunk.eval().to(self.device)
        cuts = _NETS[found][1]
        self.slices = [trunk[start:end] for start, end in zip((0, *cuts[:-1]), cuts, strict=True)]
        self.heads = [head.to(self.device) for head in heads]
        self.shift = torch.tensor(_SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(_SCALE, device=self.device).view(1, 3, 1, 1)

    def _maps(self, images: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        x = (to_unit_nchw(images, self.device) * 2.0 - 1.0 - self.shift) / self.scale
        maps = []
        for part in self.slices:
            x = part(x)
            maps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return maps

    def __call__(self, reference: torch.Tensor | np.ndarray, reconstruction: torch.Tensor | np.ndarray) -> np.ndarray:
        """Per-image LPIPS distance of uint8 ``(N, H, W, 3)`` images (0 for identical images)."""
        import torch

        with torch.inference_mode():
            total = 0.0
            for a, b, head in zip(self._maps(reference), self._maps(reconstruction), self.heads, strict=True):
                total = total + ((a - b).pow(2) * head).sum(dim=1).mean(dim=(1, 2))
            return total.double().cpu().numpy()


def save_random_lpips(path: str | os.PathLike[str], net: LpipsNet = "vgg", seed: int = 0) -> None:
    """Write an LPIPS weights file (``features.*`` trunk, ``lin{k}.model.1.weight`` heads) of random values.

    The heads are non-negative, as trained ones are.
    """
    import torch

    trunk = randomize(_trunk(net).to_empty(device="cpu"), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    state = {f"features.{key}": value for key, value in trunk.items()}
    for k, channels in enumerate(_NETS[net][2]):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1, generator=generator) / channels
    torch.save(state, path)
