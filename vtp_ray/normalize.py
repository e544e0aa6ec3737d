"""The tensor side of preprocessing: uint8 pixel batches <-> normalized float ``(N, 3, H, W)`` tensors.

``normalize`` is the single place where images become model inputs, ``denormalize_to_uint8`` the single place
where reconstructions become pixels again; both run on the tensors' own device. The normalizations themselves
are data, in ``images.NORMALIZATIONS``.
"""

from __future__ import annotations

import functools

import torch

from .images import Normalization, NormalizationKind, resolve_normalization


@functools.lru_cache(maxsize=64)
def _affine(
    norm: Normalization, inverse: bool, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) as (1, 3, 1, 1) tensors, cached so repeated calls do no host-to-device copies."""
    if inverse:  # [normalized] -> [0, 255]
        scale = [255.0 * s for s in norm.std]
        shift = [255.0 * m for m in norm.mean]
    else:  # [0, 255] -> ((x / 255) - mean) / std, with the constants folded in float64
        scale = [1.0 / (255.0 * s) for s in norm.std]
        shift = [-m / s for m, s in zip(norm.mean, norm.std, strict=True)]
    return (
        torch.tensor(scale, dtype=dtype, device=device).view(1, 3, 1, 1),
        torch.tensor(shift, dtype=dtype, device=device).view(1, 3, 1, 1),
    )


def normalize(
    images_u8: torch.Tensor,
    kind: NormalizationKind | Normalization = "imagenet",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> contiguous float ``(N, 3, H, W)``: ``(x / 255 - mean) / std``, per channel.

    Equivalent to torchvision's ``ToTensor`` + ``Normalize``, on the input's device, in two passes: a
    permute+cast copy, then one in-place fused multiply-add ``x * scale + shift`` with the constants folded
    (``scale = 1 / (255 * std)``, ``shift = -mean / std``). In float32 the result is within ~1e-6 of the
    exact value. For half-precision dtypes the arithmetic runs in float32 and is rounded once at the end (one
    extra pass), so bfloat16 / float16 outputs do not pick up the rounding of the folded constants.
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 tensor of shape (N, H, W, 3), got {images_u8.dtype} {tuple(images_u8.shape)}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    compute_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    scale, shift = _affine(resolve_normalization(kind), False, images_u8.device, compute_dtype)
    x = images_u8.permute(0, 3, 1, 2).to(dtype=compute_dtype, memory_format=torch.contiguous_format)
    torch.addcmul(shift, x, scale, out=x)  # x = x * scale + shift, in place
    return x if dtype == compute_dtype else x.to(dtype)


def denormalize_to_uint8(images: torch.Tensor, kind: NormalizationKind | Normalization = "imagenet") -> torch.Tensor:
    """Inverse of ``normalize``: float ``(N, 3, H, W)`` -> contiguous uint8 ``(N, H, W, 3)``, same device.

    Computes ``clamp(x * std + mean, 0, 1) * 255`` in float32 whatever the input dtype (the 255 is folded
    into the affine) and rounds to nearest with ``torch.round`` (ties to even) rather than truncating as a
    bare ``.to(torch.uint8)`` would, so ``normalize`` followed by ``denormalize_to_uint8`` returns the
    original pixels exactly.
    """
    if not images.dtype.is_floating_point or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected a floating point tensor of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    scale, shift = _affine(resolve_normalization(kind), True, images.device, torch.float32)
    x = torch.addcmul(shift, images.to(torch.float32), scale)  # a fresh tensor: safe to modify in place
    x.clamp_(0.0, 255.0).round_()
    return x.permute(0, 2, 3, 1).to(dtype=torch.uint8, memory_format=torch.contiguous_format)


def denormalize_to_unit(images: torch.Tensor, kind: NormalizationKind | Normalization = "imagenet") -> torch.Tensor:
    """Inverse of ``normalize`` without rounding: float32 ``(N, 3, H, W)`` in [0, 1] (for metrics such as PSNR)."""
    scale, shift = _affine(resolve_normalization(kind), True, images.device, torch.float32)
    return torch.addcmul(shift, images.to(torch.float32), scale).clamp_(0.0, 255.0).div_(255.0)
