"""VTP hyper-parameters, read from a checkpoint's ``config.json`` (``model_type: "vtp"``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

NORM_KINDS = ("layernorm", "layernormbf16", "rmsnorm")
FFN_KINDS = ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128")
CLIP_FEATS = ("cls", "pooled")
TEXT_POOLS = ("argmax", "last", "first", "none")

# Keys that transformers writes into every config.json; they say nothing about the model.
_TRANSFORMERS_BOOKKEEPING = {
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "model_type",
}


@dataclass
class VTPConfig:
    """Every field of upstream's ``VTPConfig``, with upstream's defaults."""

    image_size: int = 256
    train_clip: bool = True
    train_reconstruction: bool = True
    # Vision trunk (DINOv3-style ViT with a feature bottleneck)
    vision_patch_size: int = 16
    vision_embed_dim: int = 768
    vision_depth: int = 12
    vision_num_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_ffn_layer: str = "swiglu"
    vision_norm_layer: str = "rmsnorm"
    vision_init_values: float | None = None
    vision_use_qk_norm: bool = False
    vision_feature_bottleneck: int = 64
    vision_bottleneck_ae_only: bool = True
    vision_clip_feat: str = "cls"
    # CLIP text tower (OpenCLIP-style)
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_embed_dim: int = 768
    text_num_heads: int = 12
    text_depth: int = 12
    text_mlp_ratio: float = 4.0
    text_ls_init_value: float | None = None
    text_embed_cls: bool = False
    text_pad_id: int = 0
    text_no_causal_mask: bool = False
    text_pool_type: str = "argmax"
    text_proj_type: str = "linear"
    text_proj_bias: bool = False
    text_output_tokens: bool = False
    text_quick_gelu: bool = False
    # Pixel decoder
    decoder_embed_dim: int = 768
    decoder_num_heads: int = 12
    decoder_depth: int = 12
    decoder_ffn_layer: str = "swiglu"
    decoder_norm_layer: str = "layernorm"
    decoder_init_values: float | None = None
    decoder_use_qk_norm: bool = False
    # CLIP logits
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    nonscalar_logit_scale: bool = False
    # Fields this version does not know (kept, so that a round trip loses nothing).
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            ("vision_norm_layer", self.vision_norm_layer, NORM_KINDS),
            ("decoder_norm_layer", self.decoder_norm_layer, NORM_KINDS),
            ("vision_ffn_layer", self.vision_ffn_layer, FFN_KINDS),
            ("decoder_ffn_layer", self.decoder_ffn_layer, FFN_KINDS),
            ("vision_clip_feat", self.vision_clip_feat, CLIP_FEATS),
            ("text_pool_type", self.text_pool_type, TEXT_POOLS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"config {name}={value!r} is not one of {allowed}")
        for prefix, dim, heads in (
            ("vision", self.vision_embed_dim, self.vision_num_heads),
            ("decoder", self.decoder_embed_dim, self.decoder_num_heads),
        ):
            # Axial RoPE splits each head into 4 quarters (sin/cos for x and y).
            if dim % (4 * heads):
                raise ValueError(f"config {prefix}_embed_dim={dim} must be a multiple of 4 * {prefix}_num_heads")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VTPConfig:
        """Build from a ``config.json`` mapping; transformers' bookkeeping keys are accepted and dropped."""
        model_type = data.get("model_type", "vtp")
        if model_type != "vtp":
            raise ValueError(f"config.json has model_type={model_type!r}, expected 'vtp'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in _TRANSFORMERS_BOOKKEEPING}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> VTPConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The model's hyper-parameters as upstream's config.json spells them."""
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        data["model_type"] = "vtp"
        return data

    def digest(self) -> str:
        """A short stable hash of the hyper-parameters: two configs with the same digest build the same model."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def latent_channels(self) -> int:
        return self.vision_feature_bottleneck

    @property
    def embedding_dim(self) -> int | None:
        """Width of the CLIP embeddings (image and text), ``None`` for a checkpoint without a CLIP head."""
        return self.text_embed_dim if self.train_clip else None
