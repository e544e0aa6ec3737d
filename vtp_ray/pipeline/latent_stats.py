"""Per-channel latent statistics that merge exactly: what every output part records of its latents, and what
``stats.json`` and LightningDiT's ``latents_stats.pt`` report over all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

__all__ = ["ChannelStats"]


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel count, mean and sum of squared deviations (M2) in float64, mergeable without loss.

    Merging follows Chan et al.'s parallel update, so statistics of parts written in any order and by any run
    combine to those of all rows, with none of the cancellation that ``sum`` / ``sum of squares`` suffers.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, latents: np.ndarray, chunk: int = 256) -> ChannelStats:
        """Statistics of ``(N, C, ...)`` latents over every sample and position, per channel C."""
        n, c = latents.shape[:2]
        flat = latents.reshape(n, c, -1)
        stats = cls.empty(c)
        for start in range(0, n, chunk):  # bounded float64 temporaries
            x = flat[start : start + chunk].astype(np.float64)
            mean = x.mean(axis=(0, 2))
            m2 = np.square(x - mean[None, :, None]).sum(axis=(0, 2))
            stats = stats.merge(cls(x.shape[0] * x.shape[2], mean, m2))
        return stats

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / count)
        return ChannelStats(count, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0)."""
        return np.sqrt(self.m2 / self.count) if self.count else np.full_like(self.m2, np.nan)

    def to_json(self) -> str:
        return json.dumps({"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()})

    @classmethod
    def from_json(cls, text: str | bytes) -> ChannelStats:
        data = json.loads(text)
        return cls(int(data["count"]), np.asarray(data["mean"], np.float64), np.asarray(data["m2"], np.float64))
