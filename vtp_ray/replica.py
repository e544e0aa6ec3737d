"""``VTPReplica``: one loaded model on one device at one precision, with batch verbs on numpy.

This is the unit Ray actors hold: the Serve deployment and the Ray Data actor pool both wrap it and
neither touches normalization. Images go in as uint8 (N, H, W, 3) and come out the same way; latents
and embeddings come out as float32 numpy arrays.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from . import __version__
from .device import cpu_has_fast_low_precision, memory_stats, resolve_device, resolve_precision, synchronize
from .model import load_model
from .normalize import denormalize_to_uint8, normalize

log = logging.getLogger(__name__)


def as_image_batch(images: np.ndarray | list[np.ndarray], patch: int = 16) -> np.ndarray:
    """Validate (and stack) a batch of uint8 RGB images into one (N, H, W, 3) array."""
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


class VTPReplica:
    """Loads once, warms up, then serves batches.

    Args:
        model: a model spec (checkpoint directory or ``random:vtp-small``).
        device: ``auto`` (npu > cuda > cpu), ``npu:N``, ``cuda:N`` or ``cpu``.
        precision: ``fp32``, ``bf16`` or ``fp16`` for the matmul weights; the residual stream,
            norms, RoPE and softmax statistics stay float32.
        rope_dtype: ``float32`` (portable) or ``bfloat16`` (bit-faithful to upstream).
        warmup_size: side of the square image used to warm up; 0 skips the warm-up.
        cpu_threads: torch's intra-op threads when running on the CPU (default: torch's choice,
            which inside a Ray actor follows the actor's ``num_cpus`` through OMP_NUM_THREADS).
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        precision: str = "fp32",
        rope_dtype: str = "float32",
        warmup_size: int = 256,
        cpu_threads: int | None = None,
    ) -> None:
        started = time.perf_counter()
        self.device = resolve_device(device)
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.dtype = resolve_precision(precision)
        self.precision = precision
        if self.device.type == "cpu" and self.dtype != torch.float32 and not cpu_has_fast_low_precision(self.dtype):
            log.warning(
                "precision %s on a CPU without native %s matmuls (no AVX512-BF16/AMX): expect it to be much slower "
                "than fp32; use --precision fp32 here",
                precision,
                self.dtype,
            )
        self.loaded = load_model(model, rope_dtype=rope_dtype, device=self.device)
        self.model = self.loaded.model.to_precision(self.dtype)
        cfg = self.model.config
        self.patch_size = cfg.vision_patch_size
        self.info: dict[str, Any] = {
            "model": self.loaded.name,
            "model_spec": self.loaded.spec,
            "random_weights": self.loaded.random_weights,
            "config_digest": self.loaded.config_digest,
            "device": str(self.device),
            "device_type": self.device.type,
            "precision": precision,
            "rope_dtype": rope_dtype,
            "latent_channels": cfg.latent_channels,
            "embedding_dim": cfg.text_embed_dim if cfg.train_clip else None,
            "vtp_ray_version": __version__,
        }
        if warmup_size:
            self.warmup(warmup_size)
        log.info("VTPReplica ready in %.1fs: %s", time.perf_counter() - started, self.info)

    def warmup(self, size: int = 256) -> None:
        """Run every verb once so that kernels are selected and allocators primed before traffic."""
        blank = np.zeros((1, size, size, 3), np.uint8)
        self.reconstruct(blank)
        if self.model.visual_proj is not None:
            self.embed(blank)
        synchronize(self.device)

    # ------------------------------------------------------------------------------------- verbs

    @torch.inference_mode()
    def tokenize(self, images: np.ndarray | list[np.ndarray]) -> dict[str, np.ndarray]:
        """One trunk pass -> ``{"latents": (N, C, h, w), "clip_embedding": (N, D)}`` (float32)."""
        out = self.model.encode(self._images_in(images))
        result = {"latents": self._out(out.latents)}
        if out.clip_image_feature is not None:
            result["clip_embedding"] = self._out(out.clip_image_feature)
        return result

    @torch.inference_mode()
    def encode(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Latents only, (N, C, h, w) float32: what a diffusion model trains on."""
        return self._out(self.model.get_reconstruction_latents(self._images_in(images)))

    @torch.inference_mode()
    def reconstruct(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Encode and decode: uint8 (N, H, W, 3) -> uint8 (N, H, W, 3)."""
        latents = self.model.get_reconstruction_latents(self._images_in(images))
        return self._images_out(self.model.decode(latents))

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (N, C, h, w) -> uint8 images (N, 16h, 16w, 3)."""
        latents = np.asarray(latents)
        if latents.dtype not in (np.float32, np.float16, np.float64):
            raise TypeError(f"latents must be a float array, got {latents.dtype}")
        c = self.model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c or 0 in latents.shape:
            raise ValueError(f"latents must have shape (N, {c}, h, w), got {latents.shape}")
        if not np.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        x = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)).to(self.device)
        return self._images_out(self.model.decode(x))

    @torch.inference_mode()
    def embed(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Normalized CLIP image embeddings (N, D)."""
        return self._out(self.model.get_clip_image_feature(self._images_in(images)))

    def memory(self) -> dict[str, int]:
        return memory_stats(self.device)

    # ------------------------------------------------------------------------------------ helpers

    def _images_in(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(as_image_batch(images, self.patch_size))
        return normalize(batch.to(self.device, non_blocking=True))

    def _images_out(self, images: torch.Tensor) -> np.ndarray:
        return denormalize_to_uint8(images).cpu().numpy()

    @staticmethod
    def _out(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()
