"""The typed results of a replica (numpy only, no torch: they travel to processes that never load the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "IDENTITY_KEYS",
    "CompileStatus",
    "Encoded",
    "GraphStatus",
    "ReplicaInfo",
    "ZeroShot",
    "identity_differences",
    "model_identity",
]


@dataclass(frozen=True)
class Encoded:
    """What ``encode`` returns for a batch of N images."""

    latents: np.ndarray  # (N, C, h, w) float32
    clip_embedding: np.ndarray | None  # (N, D) float32, L2-normalized; None without a CLIP head

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int | slice) -> Encoded:
        """The results of some of the images (``encoded[i]`` keeps the batch dimension out)."""
        clip = None if self.clip_embedding is None else self.clip_embedding[index]
        return Encoded(self.latents[index], clip)

    @classmethod
    def stack(cls, parts: list[Encoded]) -> Encoded:
        """The inverse of indexing: one ``Encoded`` of the images of ``parts`` (each of one image), in order."""
        clip = None if parts[0].clip_embedding is None else np.stack([p.clip_embedding for p in parts])
        return cls(np.stack([p.latents for p in parts]), clip)


@dataclass(frozen=True)
class CompileStatus:
    """Whether a replica's image verbs run compiled, and how far compiling got (``vtp_ray.compiled``)."""

    mode: str  # what was asked: off | on | auto
    compiled: bool  # whether the image verbs run compiled graphs (once their shapes are compiled)
    backend: str | None  # inductor (CPU, CUDA), torchair (Ascend); None: eager
    reason: str  # what auto chose, or why compiling cannot work here
    ready: bool  # the warm-up size's graphs are compiled (or failed, or compiling is off): serve without 503s
    graphs: tuple[str, ...] = ()  # compiled graphs, e.g. "encoder 2-8x3x256x256" (batch 2..8 of 3x256x256)
    pending: tuple[str, ...] = ()  # queued or compiling
    failed: dict[str, str] = field(default_factory=dict)  # graph -> why it stays eager
    over_cap: tuple[str, ...] = ()  # shapes refused past max_graphs: eager for good
    max_graphs: int = 0
    max_batch: int = 0  # larger batches run in chunks of this many
    compiled_calls: int = 0  # graph calls that ran compiled code
    eager_calls: dict[str, int] = field(default_factory=dict)  # by reason: compiling, over_cap, failed, guard_miss
    compile_seconds: float = 0.0  # spent compiling, in the background
    compiles_on_calling_path: int = 0  # compiles outside the compile thread: always 0 (a defect otherwise)
    cache_hits: int = 0  # graphs loaded from the compile cache
    cache_misses: int = 0  # graphs compiled cold (and written to the cache)
    cache_dir: str | None = None  # the persistent compile cache of this machine class

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GraphStatus:
    """What a replica's CUDA graphs did: recorded shapes, replayed calls, and what ran without a graph and why."""

    enabled: bool  # whether small batches replay CUDA graphs (``vtp_ray.cuda_graphs``)
    reason: str  # why they are on or off here
    max_batch: int = 0
    max_graphs: int = 0
    graphs: tuple[str, ...] = ()  # e.g. "encoder 1x3x256x256"
    failed: dict[str, str] = field(default_factory=dict)  # shape -> the capture error
    replays: int = 0
    compiled_replays: int = 0  # replays of graphs recorded from compiled calls (a compiling replica's)
    direct_calls: dict[str, int] = field(default_factory=dict)  # by reason: large_batch, not_settled, over_cap, failed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica serves and how: everything a result must be traceable to."""

    model: str  # display name ("VTP-Small-f16d64", or "random:vtp-small (random weights)")
    model_spec: str  # absolute checkpoint path or random: spec
    random_weights: bool
    config_digest: str
    device: str
    device_type: str
    precision: str
    rope_dtype: str
    patch_size: int
    latent_channels: int
    embedding_dim: int | None
    vtp_ray_version: str
    text_context_length: int | None = None  # token ids per text; None without a text tower
    zero_shot_activation: str | None = None  # "softmax" (CLIP: no logit bias) or "sigmoid" (SigLIP: a logit bias)
    compile: CompileStatus | None = None  # how the image verbs run: compiled or eager, and why (a fresh snapshot)
    cuda_graphs: GraphStatus | None = None  # whether small batches replay CUDA graphs, and what they did

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What two replicas must share for their outputs to mix: the checkpoint and how it runs (whether compiled:
        compiled and eager outputs agree within the stated tolerances, not bit for bit)."""
        compiled = bool(self.compile is not None and self.compile.compiled)
        return {**{key: getattr(self, key) for key in IDENTITY_KEYS[:-1]}, "compiled": compiled}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReplicaInfo:
        """A ``ReplicaInfo`` from its dict (more keys, such as ``/v1/model``'s, are left out)."""
        fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        for name, status_type in (("compile", CompileStatus), ("cuda_graphs", GraphStatus)):
            if isinstance(status := fields.get(name), Mapping):
                fields[name] = status_type(**{k: status[k] for k in status_type.__dataclass_fields__ if k in status})
        return cls(**fields)


#: The fields of ``ReplicaInfo`` that identify the model a replica serves (``ReplicaInfo.identity``).
IDENTITY_KEYS = ("config_digest", "random_weights", "precision", "rope_dtype", "compiled")


def model_identity(
    config_digest: str, random_weights: bool, precision: str, rope_dtype: str, compile: str = "off"
) -> dict[str, Any]:
    """The identity (``ReplicaInfo.identity``) a job expects of the replicas it runs on. ``compile``: ``on`` wants
    them compiled, ``off`` eager, ``auto`` either (``auto`` is the replicas' own choice; None: any)."""
    compiled = {"on": True, "off": False}.get(compile)
    values = (config_digest, random_weights, precision, rope_dtype, compiled)
    return dict(zip(IDENTITY_KEYS, values, strict=True))


def identity_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """What of ``actual`` (a replica's identity) differs from ``expected`` (a job's; None: any), one line each."""
    return [
        f"{key}: {actual.get(key)!r} served, {value!r} asked for"
        for key, value in expected.items()
        if value is not None and actual.get(key) != value
    ]


@dataclass(frozen=True)
class ZeroShot:
    """Zero-shot scores of N images against C classes (class embeddings from texts)."""

    logits: np.ndarray  # (N, C) float32: exp(logit_scale) * cosine [+ logit_bias], as the checkpoint was trained
    probabilities: np.ndarray  # (N, C) float32: softmax over the classes, or sigmoid per class with a logit bias
    activation: str  # "softmax" or "sigmoid"

    def __len__(self) -> int:
        return len(self.logits)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best classes of each image, best first: ``(indices (N, k) int64, probabilities (N, k))``."""
        k = min(k, self.logits.shape[1])
        order = np.argsort(-self.logits, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.probabilities, order, axis=1)
