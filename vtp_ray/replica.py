"""``VTPReplica``: one loaded model on one device at one precision, with batch verbs on numpy.

This is the unit Ray actors hold: the Serve deployment and the Ray Data workers both wrap it, and it is the only
place that turns pixels into model inputs (normalization) and model outputs back into pixels. Images go in as
uint8 ``(N, H, W, 3)`` and come out the same way; latents and embeddings come out as float32 numpy arrays.

The verbs mean the same at every layer: ``encode`` is one trunk pass giving the latents *and* the CLIP embedding
(``VTPModel.encode``, ``/v1/encode``, ``vtp-ray tokenize``), ``decode`` turns latents into pixels, ``reconstruct``
is both, ``embed`` is the CLIP image embedding alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from . import __version__
from .arrays import as_image_batch, as_latent_batch
from .compile_plan import plan_compile, use_compile_cache
from .compiled import MAX_GRAPHS, CompiledModel, eager_status, eager_units
from .cpu_threads import TUNE_BATCH, CpuThreads
from .cpu_threads import tune as tune_threads
from .cuda_graphs import CudaGraphs
from .device import cpu_has_fast_low_precision, memory_stats, resolve_device, resolve_precision, synchronize
from .model import load_model
from .normalize import denormalize_to_uint8, normalize
from .outputs import CompileStatus, Encoded, GraphStatus, ReplicaInfo, ZeroShot
from .text.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)

__all__ = ["CompileStatus", "Encoded", "GraphStatus", "ReplicaInfo", "VTPReplica", "ZeroShot"]


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
            which inside a Ray actor follows the actor's ``num_cpus`` through OMP_NUM_THREADS); ``auto``: the fewest
            of those within 25% of the fastest at warm-up (``vtp_ray.cpu_threads``; an eager replica with a
            warm-up only, else torch's choice). ``cpu_thread_timings`` keeps what was measured.
        compile: ``off``, ``on`` or ``auto`` (where it is known to pay): the image verbs through ``torch.compile``
            (``vtp_ray.compiled``). Graphs compile in a background thread, the ``warmup_size`` ones first; until a
            shape's graph is ready its calls run eagerly. ``compile_status()`` and ``info.compile`` say how it runs.
        compile_cache: directory of the persistent compile cache (default: env ``VTP_COMPILE_CACHE``, else
            ``/tmp/vtp-ray-compile-<uid>``); a second process with a filled cache compiles in seconds.
        compile_max_batch: the largest batch of one compiled call (larger batches run in chunks of this many), and
            of one CUDA graph.
        compile_max_graphs: the most graphs this replica compiles (two per batch kind and image size).
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        precision: str = "fp32",
        rope_dtype: str = "float32",
        warmup_size: int = 256,
        cpu_threads: CpuThreads = None,
        compile: str = "off",
        compile_cache: str | None = None,
        compile_max_batch: int = 8,
        compile_max_graphs: int = MAX_GRAPHS,
        cuda_graphs: bool = True,
    ) -> None:
        started = time.perf_counter()
        self.device = resolve_device(device)
        if self.device.type == "cpu" and isinstance(cpu_threads, int) and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.dtype = resolve_precision(precision)
        if self.device.type == "cpu" and self.dtype != torch.float32 and not cpu_has_fast_low_precision(self.dtype):
            log.warning(
                "precision %s on a CPU without native %s matmuls (no AVX512-BF16/AMX): expect it to be much slower "
                "than fp32; use --precision fp32 here",
                precision,
                self.dtype,
            )
        plan = plan_compile(compile, self.device, self.dtype)
        loaded = load_model(model, rope_dtype=rope_dtype, device=self.device)
        self.model = loaded.model.to_precision(self.dtype)
        self._compiled: CompiledModel | None = None
        self._eager_status = eager_status(plan)
        units = eager_units(self.model)
        if plan.enabled:
            cache = use_compile_cache(compile_cache, self.device)
            self._compiled = CompiledModel(
                self.model, self.device, plan, compile_max_batch, compile_max_graphs, cache_dir=cache
            )
            units = {"encoder": self._compiled.encoder, "decoder": self._compiled.decoder}
            log.info("%s: %s, cache %s", plan.reason, plan.backend, cache)
        elif compile != "off":
            (log.warning if compile == "on" else log.info)("compile=%s: %s", compile, plan.reason)
        self._graphs: CudaGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            settled = self._compiled.settled if self._compiled is not None else None
            self._graphs = CudaGraphs(units, self.device, compile_max_batch, settled=settled)
            units = {"encoder": self._graphs.encoder, "decoder": self._graphs.decoder}
        why = "cuda_graphs=False" if not cuda_graphs else f"not on CUDA ({self.device.type})"
        self._graphs_off = GraphStatus(enabled=False, reason=why)
        self._encoder, self._decoder = units["encoder"], units["decoder"]
        self._eager = eager_units(self.model)
        cfg = self.model.config
        self._info = ReplicaInfo(
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
        #: ``cpu_threads="auto"``: seconds per warm-up call by thread count (empty where nothing was tried).
        self.cpu_thread_timings: dict[int, float] = {}
        if warmup_size:
            self.warmup(warmup_size)
            if cpu_threads == "auto" and self.device.type == "cpu" and self._compiled is None:
                self.cpu_thread_timings = self._tune_cpu_threads(warmup_size)
        #: torch's intra-op threads in the thread that built the replica (OpenMP's count is per calling thread).
        self.cpu_threads = torch.get_num_threads()
        log.info("VTPReplica ready in %.1fs: %s", time.perf_counter() - started, self._info)

    def warmup(self, size: int = 256) -> None:
        """Run the image verbs once eagerly, so that kernels are selected and allocators primed before traffic; a
        compiling replica then queues the graphs of ``size`` x ``size`` images (``compile_ready`` says when)."""
        with torch.inference_mode():
            latents, _ = self._eager["encoder"](self._images_in(np.zeros((1, size, size, 3), np.uint8)))
            self._eager["decoder"](latents)
        synchronize(self.device)
        if self._compiled is not None:
            self._compiled.warm(size)
        elif self._graphs is not None:  # one image's graphs now, for the first online request (compiled: once ready)
            with torch.inference_mode():
                latents, _ = self._encoder(self._images_in(np.zeros((1, size, size, 3), np.uint8)))
                self._decoder(latents)

    def _tune_cpu_threads(self, size: int) -> dict[int, float]:
        most = torch.get_num_threads()
        images = {batch: np.zeros((batch, size, size, 3), np.uint8) for batch in (1, TUNE_BATCH)}
        timings = tune_threads(lambda batch: self.encode(images[batch]), torch.set_num_threads, most)
        log.info(
            "cpu_threads=auto: %d of %d (%s)", torch.get_num_threads(), most,
            ", ".join(f"{n}: {s * 1000:.2f} ms" for n, s in timings.items()) or "a one-image call is long: all kept",
        )  # fmt: skip
        return timings

    # ---------------------------------------------------------------------------------- compiling

    @property
    def info(self) -> ReplicaInfo:
        """What this replica serves and how, with fresh snapshots of ``compile_status()`` and ``graph_status()``."""
        return dataclasses.replace(self._info, compile=self.compile_status(), cuda_graphs=self.graph_status())

    @info.setter
    def info(self, value: ReplicaInfo) -> None:
        self._info = value

    def compile_status(self) -> CompileStatus:
        """Whether the image verbs run compiled, which graphs are ready, and how many calls ran eagerly and why."""
        return self._eager_status if self._compiled is None else self._compiled.status(self._eager_status.mode)

    def graph_status(self) -> GraphStatus:
        """Whether small batches replay CUDA graphs (``vtp_ray.cuda_graphs``), which shapes, and what ran without."""
        return self._graphs_off if self._graphs is None else self._graphs.status("on (CUDA)")

    @property
    def compile_ready(self) -> bool:
        """False while the warm-up size's graphs are still compiling (a server answers 503 meanwhile)."""
        return self._compiled is None or self._compiled.ready

    def wait_compiled(self, timeout: float | None = None, all_shapes: bool = False) -> bool:
        """Block until ``compile_ready`` (with ``all_shapes``: until nothing is queued or compiling), or ``timeout``
        seconds; returns whether that happened."""
        if self._compiled is None:
            return True
        return self._compiled.wait_idle(timeout) if all_shapes else self._compiled.wait_ready(timeout)

    # ------------------------------------------------------------------------------------- verbs

    @torch.inference_mode()
    def encode(self, images: np.ndarray | list[np.ndarray]) -> Encoded:
        """One trunk pass: latents ``(N, C, h, w)`` and the normalized CLIP embedding ``(N, D)``, float32."""
        latents, clip = self._encoder(self._images_in(images))
        return Encoded(self._out(latents), None if clip is None else self._out(clip))

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``(N, C, h, w)`` (any float dtype) -> uint8 images ``(N, 16h, 16w, 3)``."""
        latents = as_latent_batch(latents, self._info.latent_channels)
        return self._images_out(self._decoder(torch.from_numpy(latents).to(self.device)))

    @torch.inference_mode()
    def reconstruct(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Encode and decode: uint8 ``(N, H, W, 3)`` -> uint8 ``(N, H, W, 3)``."""
        latents, _ = self._encoder(self._images_in(images))
        return self._images_out(self._decoder(latents))

    @torch.inference_mode()
    def embed(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Normalized CLIP image embeddings ``(N, D)``."""
        self._require_clip()
        _, clip = self._encoder(self._images_in(images))
        return self._out(clip)

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Normalized CLIP text embeddings ``(N, D)`` of N strings (OpenAI CLIP BPE, the checkpoint's context)."""
        from .text.tokenizer import tokenize

        self._require_clip()
        if self._info.text_context_length is None:
            raise ValueError(
                f"this model's text tower has {self.model.config.text_vocab_size} token ids, not the {VOCAB_SIZE} of "
                "CLIP's BPE vocabulary: it cannot embed text"
            )
        if not len(texts):
            return np.zeros((0, self._info.embedding_dim), np.float32)
        ids = tokenize(texts, self._info.text_context_length)
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
            torch.from_numpy(np.array(a, np.float32)).to(self.device) for a in (image_embeddings, class_embeddings)
        )
        logits = self.model.clip_logits(images, classes)
        activation = self._info.zero_shot_activation
        probabilities = logits.sigmoid() if activation == "sigmoid" else logits.softmax(dim=-1)
        return ZeroShot(self._out(logits), self._out(probabilities), activation)

    def classify(self, images: np.ndarray | list[np.ndarray], class_embeddings: np.ndarray) -> ZeroShot:
        """Zero-shot classification of uint8 images ``(N, H, W, 3)`` against class embeddings ``(C, D)``."""
        return self.zero_shot(self.embed(images), class_embeddings)

    def memory(self) -> dict[str, int]:
        return memory_stats(self.device)

    # ------------------------------------------------------------------------------------ helpers

    def _require_clip(self) -> None:
        if self._info.embedding_dim is None:
            raise ValueError("this model has no CLIP head (train_clip is false)")

    def _images_in(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(as_image_batch(images, self._info.patch_size))
        return normalize(batch.to(self.device, non_blocking=True))

    def _images_out(self, images: torch.Tensor) -> np.ndarray:
        return denormalize_to_uint8(images).cpu().numpy()

    @staticmethod
    def _out(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()
