"""Host-side checks of the arrays that cross into a replica: image batches and latents (numpy only, no torch).

The replica, the Serve ingress and the pipelines all validate through these two functions, so a shape or dtype
rule is written once. Both raise ``ValueError`` / ``TypeError`` with a message that names what was expected.
"""

from __future__ import annotations

import numpy as np

from .images import PATCH_SIZE

__all__ = ["as_image_batch", "as_latent_batch"]


def as_image_batch(images: np.ndarray | list[np.ndarray], patch: int = PATCH_SIZE) -> np.ndarray:
    """Validate (and stack) a batch of uint8 RGB images into one ``(N, H, W, 3)`` array."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("empty image batch")
        shapes = {np.shape(im) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
        images = np.stack(images)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(
            f"images must be a uint8 numpy array, got {type(images).__name__} {getattr(images, 'dtype', '')}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    if n == 0 or h == 0 or w == 0 or h % patch or w % patch:
        raise ValueError(f"image height and width must be positive multiples of {patch}, got {h}x{w} (N={n})")
    return images


def as_latent_batch(latents: np.ndarray, channels: int, max_side: int | None = None) -> np.ndarray:
    """Validate latents ``(N, C, h, w)``: any float dtype (converted to C-contiguous float32), finite values.

    ``max_side`` (pixels) bounds the image they decode to (``16 * max(h, w)``); over it is a ``ValueError`` whose
    message says so (callers that answer HTTP map it to 413 through ``LatentsTooLarge``).
    """
    latents = np.asarray(latents)
    if latents.dtype.kind != "f":
        raise TypeError(f"latents must be a float array, got {latents.dtype}")
    if latents.ndim != 4 or latents.shape[1] != channels or 0 in latents.shape:
        raise ValueError(f"latents must have shape (N, {channels}, h, w) with N, h, w >= 1, got {list(latents.shape)}")
    h, w = latents.shape[2:]
    if max_side is not None and max(h, w) * PATCH_SIZE > max_side:
        raise LatentsTooLarge(
            f"latents of {h}x{w} decode to {h * PATCH_SIZE}x{w * PATCH_SIZE} pixels, "
            f"over the limit of {max_side} a side"
        )
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if not np.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf")
    return latents


class LatentsTooLarge(ValueError):
    """Latents that would decode to an image larger than allowed."""
