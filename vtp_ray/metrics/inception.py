"""The rFID network: pytorch-fid's FID Inception v3 with local weights (and torchvision's, which is not it).

``FidInceptionFeatures`` is ``pytorch_fid.inception.InceptionV3`` itself, the network behind upstream VTP's rFID
(``pytorch_fid.fid_score.calculate_fid_given_paths``): TF Inception ported to PyTorch, bilinear resize to 299x299,
inputs in [-1, 1], 2048-d pool3 features. Only its weights loader is pointed at a local file.

torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's Inception) was measured and not used: the same network
(it loads pytorch-fid's weights file unchanged), but it resizes like TensorFlow 1 and scales by ``(x - 128) / 128``.
On 24 smooth 256x256 images and their blurred copies, with two random weight sets, torch-fidelity's features differ
from pytorch-fid's by 0.4-0.6 % (relative), the FID by 0.9-1.7 %, and torchmetrics' FID by 0.2-0.8 % (its own
distance adds its own error with few images): far beyond float tolerance, so not upstream's number.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from .pixel import to_unit_nchw
from .weights import randomize

if TYPE_CHECKING:
    import torch

__all__ = ["INCEPTION_DIM", "FidInceptionFeatures", "save_random_fid_inception"]

INCEPTION_DIM = 2048
_BUILD = threading.Lock()


def _pytorch_fid_inception(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3`` (up to the 2048-d pool) with the weights ``state`` instead of a download.

    pytorch-fid has no local-file option: ``fid_inception_v3`` calls ``load_state_dict_from_url(FID_WEIGHTS_URL)``
    and loads the result strictly. While the network is built, that name in its module returns ``state``, so no
    download can start; a pytorch-fid without that name fails here rather than downloading.
    """
    from pytorch_fid import inception as fid

    if not hasattr(fid, "load_state_dict_from_url"):
        raise ImportError("this pytorch-fid has no inception.load_state_dict_from_url: install pytorch-fid 0.3")
    with _BUILD:
        original = fid.load_state_dict_from_url
        fid.load_state_dict_from_url = lambda *_args, **_kwargs: state
        try:
            return fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIM]])
        finally:
            fid.load_state_dict_from_url = original


class FidInceptionFeatures:
    """pytorch-fid's FID Inception v3 with local weights: uint8 images -> 2048-d pool features (float32 numpy).

    ``weights``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` unchanged (or ``save_random_fid_inception``).
    Images ``(N, H, W, 3)`` of any size enter as pytorch-fid's file loader hands PNGs over (``uint8 / 255``): the
    rFID of uint8 reconstructions is the rFID upstream computes from its saved PNGs.
    """

    def __init__(self, weights: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        import torch

        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            net = _pytorch_fid_inception(state)
        except RuntimeError as e:  # strict load_state_dict: missing / unexpected keys, wrong shapes
            raise ValueError(f"{str(weights)!r} is not a pytorch-fid FID Inception weights file: {e}") from e
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = to_unit_nchw(images, self.device)
            return self.net(x)[0].reshape(len(x), INCEPTION_DIM).float().cpu().numpy()


def save_random_fid_inception(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Write a file of pytorch-fid's FID Inception weights layout with random values (tests, benchmarks).

    That layout is torchvision's ``inception_v3(num_classes=1008, aux_logits=False)``: pytorch-fid's patched blocks
    subclass torchvision's and keep their parameters.
    """
    import torch
    from torchvision.models import inception_v3

    with torch.device("meta"):
        net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(randomize(net.to_empty(device="cpu"), seed), path)
