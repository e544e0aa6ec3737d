"""PSNR and SSIM, as upstream VTP computes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["psnr", "ssim"]


def psnr(
    reference: np.ndarray | torch.Tensor, reconstruction: np.ndarray | torch.Tensor, peak: float = 255.0
) -> np.ndarray:
    """Per-image PSNR in dB of ``(N, ...)`` images (0-255 pixels: ``peak`` 255); ``inf`` where identical.

    Upstream's ``20 log10(255 / sqrt(MSE))`` per image, in float64. uint8 or float arrays; CPU tensors too.
    """
    diff = np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)
    mse = (diff * diff).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / mse)


def to_unit_nchw(images: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in [0, 1] on ``device``: ``uint8 / 255`` as ``to_tensor``."""
    import torch

    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.to(device).permute(0, 3, 1, 2).float().div_(255.0)


def ssim(reference: torch.Tensor | np.ndarray, reconstruction: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 ``(N, H, W, 3)`` images: torchmetrics with upstream's ``data_range=1.0`` on [0, 1].

    Upstream's ``StructuralSimilarityIndexMeasure(data_range=1.0)`` (11x11 Gaussian, sigma 1.5, k1 0.01, k2 0.03)
    reports the mean of these values. Runs on the images' device.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(
        to_unit_nchw(reference), to_unit_nchw(reconstruction), data_range=1.0, reduction="none"
    )
    return values.double().cpu().numpy().reshape(-1)
