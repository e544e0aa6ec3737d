"""Fréchet distance of two Gaussians (the distance of rFID) and running feature statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FeatureStats", "frechet_distance", "frechet_distance_of_samples"]


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
