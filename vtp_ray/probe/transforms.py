"""The linear probe's image transforms, as torchvision defines them, with Pillow and numpy (no torch).

Training: ``RandomResizedCrop(size, bicubic)`` then a horizontal flip with probability 1/2. Validation (and the
fast mode's features): ``Resize(resize_size, bicubic)`` (the short side) then ``CenterCrop(size)``. On PIL images
torchvision does exactly this: Pillow's bicubic resize (antialiased) of the cropped region, with the box drawn as
below; ``tests/test_linear_probe.py`` checks the pixels against torchvision itself. Normalization (ImageNet's
mean and std) happens on the model's device (``normalize.normalize``), as for every other job.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["random_crop_box", "random_resized_crop", "resize_center_crop"]

_BICUBIC = Image.Resampling.BICUBIC


def random_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop, as ``RandomResizedCrop.get_params`` draws it.

    Ten tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``; the first box
    that fits is placed uniformly. If none fits, the largest box of the image whose ratio is clamped to ``ratio``,
    centered.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> np.ndarray:
    """The training transform: a random box (``random_crop_box``) resized to ``size x size`` (bicubic), then, with
    ``flip``, mirrored left-right with probability 1/2. Returns uint8 ``(size, size, 3)``."""
    top, left, h, w = random_crop_box(img.width, img.height, rng, scale, ratio)
    # Crop, then resize: Pillow's resize(box=...) would let the filter read pixels outside the box.
    out = img.crop((left, top, left + w, top + h)).resize((size, size), _BICUBIC)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def resize_center_crop(img: Image.Image, resize_size: int, size: int) -> np.ndarray:
    """The evaluation transform: the short side resized to ``resize_size`` (bicubic; the long side scaled and
    truncated, as torchvision does), then the center ``size x size`` crop. Returns uint8 ``(size, size, 3)``."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_size * long / short)
    new_size = (resize_size, new_long) if width <= height else (new_long, resize_size)
    if new_size != img.size:
        img = img.resize(new_size, _BICUBIC)
    top = round((img.height - size) / 2.0)
    left = round((img.width - size) / 2.0)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
