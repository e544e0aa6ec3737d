"""``VTPReplica``: one loaded model on one device at one precision, with batch verbs on numpy.

This is the unit Ray actors hold: the Serve deployment and the Ray Data workers both wrap it, and it is the only
place that turns pixels into model inputs (normalization) and model outputs back into pixels. Images go in as
uint8 ``(N, H, W, 3)`` and come out the same way; latents and embeddings come out as float32 numpy arrays.

The verbs mean the same at every layer: ``encode`` is one trunk pass giving the latents *and* the CLIP embedding
(``VTPModel.encode``, ``/v1/encode``, ``vtp-ray tokenize``), ``decode`` turns latents into pixels, ``reconstruct``
is both, ``embed`` is the CLIP image embedding alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from . import __version__
from .arrays import as_image_batch, as_latent_batch
from .device import cpu_has_fast_low_precision, memory_stats, resolve_device, resolve_precision, synchronize
from .model import load_model
from .normalize import denormalize_to_uint8, normalize
from .outputs import Encoded, ReplicaInfo, ZeroShot
from .text.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)

__all__ = ["Encoded", "ReplicaInfo", "VTPReplica", "ZeroShot"]


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
        if self.device.type == "cpu" and self.dtype != torch.float32 and not cpu_has_fast_low_precision(self.dtype):
            log.warning(
                "precision %s on a CPU without native %s matmuls (no AVX512-BF16/AMX): expect it to be much slower "
                "than fp32; use --precision fp32 here",
                precision,
                self.dtype,
            )
        loaded = load_model(model, rope_dtype=rope_dtype, device=self.device)
        self.model = loaded.model.to_precision(self.dtype)
        cfg = self.model.config
        self.info = ReplicaInfo(
            model=loaded.name,
            model_spec=loaded.spec,
            random_weights=loaded.random_weights,
            config_digest=loaded.config_digest,
            device=str(self.device),
            device_type=self.device.type,
            precision=precision,
            rope_dtype=rope_dtype,
            patch_size=cfg.vision_patch_size,
            latent_channels=cfg.latent_channels,
            embedding_dim=cfg.embedding_dim,
            vtp_ray_version=__version__,
            # CLIP's BPE ids only fit a text tower with the full vocabulary (test checkpoints may have a tiny one).
            text_context_length=cfg.text_context_length
            if cfg.train_clip and cfg.text_vocab_size >= VOCAB_SIZE
            else None,
            zero_shot_activation=(
                None if not cfg.train_clip else "softmax" if self.model.logit_bias is None else "sigmoid"
            ),
        )
        if warmup_size:
            self.warmup(warmup_size)
        log.info("VTPReplica ready in %.1fs: %s", time.perf_counter() - started, self.info)

    def warmup(self, size: int = 256) -> None:
        """Run every verb once so that kernels are selected and allocators primed before traffic."""
        self.reconstruct(np.zeros((1, size, size, 3), np.uint8))
        synchronize(self.device)

    # ------------------------------------------------------------------------------------- verbs

    @torch.inference_mode()
    def encode(self, images: np.ndarray | list[np.ndarray]) -> Encoded:
        """One trunk pass: latents ``(N, C, h, w)`` and the normalized CLIP embedding ``(N, D)``, float32."""
        out = self.model.encode(self._images_in(images))
        clip = None if out.clip_image_feature is None else self._out(out.clip_image_feature)
        return Encoded(self._out(out.latents), clip)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``(N, C, h, w)`` (any float dtype) -> uint8 images ``(N, 16h, 16w, 3)``."""
        latents = as_latent_batch(latents, self.info.latent_channels)
        return self._images_out(self.model.decode(torch.from_numpy(latents).to(self.device)))

    @torch.inference_mode()
    def reconstruct(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Encode and decode: uint8 ``(N, H, W, 3)`` -> uint8 ``(N, H, W, 3)``."""
        latents = self.model.get_reconstruction_latents(self._images_in(images))
        return self._images_out(self.model.decode(latents))

    @torch.inference_mode()
    def embed(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Normalized CLIP image embeddings ``(N, D)``."""
        self._require_clip()
        return self._out(self.model.get_clip_image_feature(self._images_in(images)))

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Normalized CLIP text embeddings ``(N, D)`` of N strings (OpenAI CLIP BPE, the checkpoint's context)."""
        from .text.tokenizer import tokenize

        self._require_clip()
        if self.info.text_context_length is None:
            raise ValueError(
                f"this model's text tower has {self.model.config.text_vocab_size} token ids, not the {VOCAB_SIZE} of "
                "CLIP's BPE vocabulary: it cannot embed text"
            )
        if not len(texts):
            return np.zeros((0, self.info.embedding_dim), np.float32)
        ids = tokenize(texts, self.info.text_context_length)
        cfg = self.model.config
        if not cfg.text_no_causal_mask and cfg.text_pool_type == "argmax":
            # Causal attention pooled at the end token: the padding after the longest text changes nothing.
            ids = ids[:, : int((ids != cfg.text_pad_id).sum(axis=1).max())]
        return self._out(self.model.get_clip_text_feature(torch.from_numpy(ids).to(self.device)))

    @torch.inference_mode()
    def zero_shot(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> ZeroShot:
        """Score normalized image embeddings ``(N, D)`` against class embeddings ``(C, D)`` with the checkpoint's
        logit scale (and bias): softmax over the classes for CLIP, sigmoid per class where a logit bias says the
        model was trained SigLIP-style."""
        self._require_clip()
        images, classes = (
            torch.from_numpy(np.asarray(a, np.float32)).to(self.device) for a in (image_embeddings, class_embeddings)
        )
        logits = self.model.clip_logits(images, classes)
        probabilities = logits.sigmoid() if self.info.zero_shot_activation == "sigmoid" else logits.softmax(dim=-1)
        return ZeroShot(self._out(logits), self._out(probabilities), self.info.zero_shot_activation)

    def classify(self, images: np.ndarray | list[np.ndarray], class_embeddings: np.ndarray) -> ZeroShot:
        """Zero-shot classification of uint8 images ``(N, H, W, 3)`` against class embeddings ``(C, D)``."""
        return self.zero_shot(self.embed(images), class_embeddings)

    def memory(self) -> dict[str, int]:
        return memory_stats(self.device)

    # ------------------------------------------------------------------------------------ helpers

    def _require_clip(self) -> None:
        if self.info.embedding_dim is None:
            raise ValueError("this model has no CLIP head (train_clip is false)")

    def _images_in(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(as_image_batch(images, self.info.patch_size))
        return normalize(batch.to(self.device, non_blocking=True))

    def _images_out(self, images: torch.Tensor) -> np.ndarray:
        return denormalize_to_uint8(images).cpu().numpy()

    @staticmethod
    def _out(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()
