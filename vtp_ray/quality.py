"""Reconstruction quality metrics: PSNR, SSIM, LPIPS, and rFID (Inception pool features + Fréchet distance).

Images are uint8 ``(N, H, W, 3)`` arrays or tensors. torch is needed for SSIM / LPIPS / Inception; torchvision and
torchmetrics are imported lazily, only by the functions that use them. Network weights are never downloaded: they
come from local files (``VTP_INCEPTION_WEIGHTS`` / ``VTP_LPIPS_WEIGHTS`` or explicit paths).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "INCEPTION_ENV",
    "LPIPS_ENV",
    "FeatureStats",
    "InceptionFeatures",
    "Lpips",
    "MissingWeightsError",
    "frechet_distance",
    "frechet_distance_of_samples",
    "psnr",
    "resolve_weights",
    "ssim",
]

INCEPTION_ENV = "VTP_INCEPTION_WEIGHTS"
LPIPS_ENV = "VTP_LPIPS_WEIGHTS"
INCEPTION_DIM = 2048
# LPIPS v0.1 (AlexNet): the input scaling layer and the channels of the five compared feature maps.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_CHANNELS = (64, 192, 384, 256, 256)
_ALEXNET_CUTS = (2, 5, 8, 10, 12)  # torchvision alexnet.features indices after relu1 .. relu5


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


# ------------------------------------------------------------------------------------------ pixel metrics


def psnr(reference: np.ndarray, reconstruction: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of ``(N, ...)`` arrays (uint8 pixels: peak 255); ``inf`` where they are identical."""
    diff = np.asarray(reference, np.float64) - np.asarray(reconstruction, np.float64)
    mse = (diff * diff).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / mse)


def _nchw_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """Per-image SSIM of uint8 ``(N, H, W, 3)`` tensors (torchmetrics: 11x11 Gaussian, sigma 1.5, range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    values = structural_similarity_index_measure(
        _nchw_unit(reconstruction), _nchw_unit(reference), data_range=1.0, reduction="none"
    )
    return values.double().cpu().numpy().reshape(-1)


# ------------------------------------------------------------------------------------------------- rFID


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``.

    ``tr sqrt(S1 S2)`` is the sum of the square roots of the eigenvalues of the symmetric ``sqrt(S1) S2 sqrt(S1)``
    (same spectrum), so only symmetric eigendecompositions are needed; tiny negative eigenvalues from rounding
    are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    values, vectors = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_root, 0.0))


def frechet_distance_of_samples(x: np.ndarray, y: np.ndarray) -> float:
    """``frechet_distance`` of the sample means and covariances of ``x (n1, d)`` and ``y (n2, d)``, for few samples.

    With centered ``X``, ``Y``: ``tr sqrt(S1 S2)`` is the nuclear norm of ``X Y^T / sqrt((n1 - 1)(n2 - 1))`` (the
    non-zero eigenvalues of ``S1 S2`` are those of ``X Y^T Y X^T``), an ``n1 x n2`` SVD instead of ``d x d``
    eigendecompositions: exact, and fast while ``n < d`` (where the covariances are singular).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need (n, d) samples with the same d and n >= 2, got {x.shape} and {y.shape}")
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    scale = np.sqrt((len(x) - 1) * (len(y) - 1))
    trace_root = np.linalg.svd(xc @ yc.T / scale, compute_uv=False).sum()
    diff = mx - my
    traces = (xc * xc).sum() / (len(x) - 1) + (yc * yc).sum() / (len(y) - 1)
    return float(max(diff @ diff + traces - 2.0 * trace_root, 0.0))


@dataclass
class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums), fed batch by batch.

    Up to ``dim`` vectors are also kept as they are, for ``frechet_distance_of_samples`` (fewer samples than
    dimensions: singular covariances, whose ``d x d`` eigendecomposition is slow and ill-conditioned).
    """

    dim: int
    count: int = 0
    total: np.ndarray = field(init=False)
    outer: np.ndarray = field(init=False)
    samples: list[np.ndarray] | None = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)
        self.samples = []

    def add(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64).reshape(-1, self.dim)
        self.count += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        if self.samples is not None:
            self.samples = [*self.samples, x] if self.count <= self.dim else None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def frechet_to(self, other: FeatureStats) -> float:
        """Fréchet distance of the two Gaussians (from the kept samples while there are few)."""
        if self.samples is not None and other.samples is not None and min(self.count, other.count) >= 2:
            return frechet_distance_of_samples(np.concatenate(self.samples), np.concatenate(other.samples))
        return frechet_distance(*self.mean_cov(), *other.mean_cov())


class InceptionFeatures:
    """torchvision Inception v3 with local weights: uint8 images -> 2048-d pool features (float32 numpy).

    Images are resized to 299x299 (bilinear) and scaled to [-1, 1], the input of torchvision's and pytorch-fid's
    Inception weights. ``weights``: a state dict file of ``inception_v3`` (auxiliary-classifier keys ignored).
    """

    def __init__(self, weights: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        import torch
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits.")})
        net.fc = torch.nn.Identity()
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = images.to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.net(x).float().cpu().numpy()


# ------------------------------------------------------------------------------------------------ LPIPS


class Lpips:
    """LPIPS v0.1 with an AlexNet trunk (Zhang et al. 2018), from one local state dict file.

    The file holds torchvision ``alexnet().features`` weights as ``features.*`` and the five linear heads as
    ``lin0.weight`` .. ``lin4.weight`` (shape ``(1, C, 1, 1)``): merge torchvision's AlexNet weights with the
    ``lpips`` package's ``weights/v0.1/alex.pth`` (``lin{k}.model.1.weight`` -> ``lin{k}.weight``).
    """

    def __init__(self, weights: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        import torch
        from torchvision.models import alexnet

        state = torch.load(weights, map_location="cpu", weights_only=True)
        features = alexnet(weights=None).features
        features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
        self.device = torch.device(device)
        self.features = features.eval().to(self.device)
        self.lins = [state[f"lin{k}.weight"].reshape(1, c, 1, 1).to(self.device) for k, c in enumerate(_LPIPS_CHANNELS)]
        self.shift = torch.tensor(_LPIPS_SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(_LPIPS_SCALE, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def save_random(path: str | os.PathLike[str], seed: int = 0) -> None:
        """Write a weights file of the expected layout with random values (tests, benchmarks)."""
        import torch
        from torchvision.models import alexnet

        torch.manual_seed(seed)
        state = {f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}
        state.update({f"lin{k}.weight": torch.rand(1, c, 1, 1) / c for k, c in enumerate(_LPIPS_CHANNELS)})
        torch.save(state, path)

    def _maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images.to(self.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0) - self.shift) / self.scale
        maps, start = [], 0
        for cut in _ALEXNET_CUTS:
            x = self.features[start:cut](x)
            start = cut
            maps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return maps

    def __call__(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
        """Per-image LPIPS distance of uint8 ``(N, H, W, 3)`` tensors (0 for identical images)."""
        import torch

        with torch.inference_mode():
            total = 0.0
            for a, b, lin in zip(self._maps(reference), self._maps(reconstruction), self.lins, strict=True):
                total = total + ((a - b).pow(2) * lin).sum(dim=1).mean(dim=(1, 2))
            return total.double().cpu().numpy()
