"""VTP: a ViT tokenizer whose one trunk pass yields diffusion latents and a CLIP image embedding.

1. **Trunk.** The image is cut into 16x16 patches, a cls token is prepended, and pre-norm transformer
   blocks with axial RoPE (patch tokens only) run over the sequence; a final norm closes it.
2. **Bottleneck.** A bias-free linear map squeezes each normed patch token to C channels (64 in the
   released models): the latents, laid out as (B, C, H/16, W/16).
3. **CLIP head.** The normed cls token (or the patch mean) goes through ``visual_proj``; with
   ``vision_bottleneck_ae_only`` (the released default) it skips the bottleneck.
4. **Pixel decoder.** Latents are lifted back to the decoder width, run through RoPE blocks on the
   latent grid, normed, projected to 3*16*16 values per token and pixel-shuffled to the image.
5. **Text tower.** An OpenCLIP text transformer for zero-shot use of the CLIP embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import LoadedModel, build_model
from .config import VTPConfig
from .layers import AxialRoPE, Block, LayerNorm, Linear, TextBlock, TokenConv1x1, make_norm
from .source import read_spec

DECODER_UPSCALE = 16  # the pixel decoder always undoes a 16x16 patchification


@dataclass
class EncodeOutput:
    """What one trunk pass gives: the latents and the CLIP image embedding (L2-normalized)."""

    latents: Tensor  # (B, C, H/16, W/16)
    clip_image_feature: Tensor | None  # (B, D), None when the checkpoint has no CLIP head


def _check_image(image: Tensor, patch: int) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    if h % patch or w % patch or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {patch}, got {h}x{w}")


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, H/p * W/p, D), row-major over the patch grid."""
        x = self.proj(image.to(self.proj.weight.dtype))
        return x.flatten(2).transpose(1, 2)


class VisionTrunk(nn.Module):
    """DINOv3-style ViT with a cls token, axial RoPE and a feature bottleneck."""

    def __init__(self, cfg: VTPConfig, rope_dtype: torch.dtype) -> None:
        super().__init__()
        dim = cfg.vision_embed_dim
        self.patch_size = cfg.vision_patch_size
        self.patch_embed = PatchEmbed(cfg.vision_patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training-only; stored in every checkpoint
        self.rope_embed = AxialRoPE(dim, cfg.vision_num_heads, dtype=rope_dtype)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.vision_num_heads,
                mlp_ratio=cfg.vision_mlp_ratio,
                ffn=cfg.vision_ffn_layer,
                norm=cfg.vision_norm_layer,
                layerscale=cfg.vision_init_values,
                use_qk_norm=cfg.vision_use_qk_norm,
            )
            for _ in range(cfg.vision_depth)
        )
        self.norm = make_norm(cfg.vision_norm_layer, dim)
        bottleneck = cfg.vision_feature_bottleneck
        self.feature_bottleneck = Linear(dim, bottleneck, bias=False) if bottleneck != dim else None

    def run_blocks(self, image: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Tokens after the last block (float32, un-normed), plus the outputs of the blocks in ``keep``."""
        _check_image(image, self.patch_size)
        h, w = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        patches = self.patch_embed(image).float()
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        rope = self.rope_embed.sincos(h, w, prefix=1)
        kept = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope)
            if i in keep:
                kept.append(x)
        return x, kept

    def forward(self, image: Tensor) -> Tensor:
        """Normed tokens (B, 1 + N, D): the cls token first, then the patch tokens."""
        x, _ = self.run_blocks(image)
        return self.norm(x)

    def bottleneck(self, tokens: Tensor) -> Tensor:
        return tokens if self.feature_bottleneck is None else self.feature_bottleneck(tokens).float()


class PixelDecoder(nn.Module):
    """Latents (B, C, h, w) -> image (B, 3, 16h, 16w), normalized like the encoder's input."""

    def __init__(self, cfg: VTPConfig, rope_dtype: torch.dtype) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.proj_in = TokenConv1x1(cfg.vision_feature_bottleneck, dim)
        self.rope_embed = AxialRoPE(dim, cfg.decoder_num_heads, dtype=rope_dtype)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.decoder_num_heads,
                mlp_ratio=4.0,
                ffn=cfg.decoder_ffn_layer,
                norm=cfg.decoder_norm_layer,
                layerscale=cfg.decoder_init_values,
                use_qk_norm=cfg.decoder_use_qk_norm,
            )
            for _ in range(cfg.decoder_depth)
        )
        self.norm = make_norm(cfg.decoder_norm_layer, dim)
        self.proj_out = TokenConv1x1(dim, 3 * DECODER_UPSCALE**2)

    def forward(self, latents: Tensor) -> Tensor:
        b, _, h, w = latents.shape
        x = self.proj_in(latents.flatten(2).transpose(1, 2)).float()
        rope = self.rope_embed.sincos(h, w)
        for block in self.blocks:
            x = block(x, rope)
        x = self.proj_out(self.norm(x)).float()  # (B, h*w, 3*16*16)
        # PixelShuffle(16) on token rows: channel index = colour * 256 + dy * 16 + dx.
        r = DECODER_UPSCALE
        return x.view(b, h, w, 3, r, r).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * r, w * r)


class TextTransformer(nn.Module):
    def __init__(self, cfg: VTPConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            TextBlock(
                cfg.text_embed_dim, cfg.text_num_heads, cfg.text_mlp_ratio, cfg.text_ls_init_value, cfg.text_quick_gelu
            )
            for _ in range(cfg.text_depth)
        )

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VTPModel(nn.Module):
    """The VTP tokenizer, with upstream's public methods and parameter names.

    Build it with :func:`vtp_ray.model.load_model` / :meth:`from_pretrained`; inputs are images
    normalized with ImageNet mean/std, shape (B, 3, H, W), H and W multiples of 16.
    """

    def __init__(self, config: VTPConfig, rope_dtype: str | torch.dtype = torch.float32) -> None:
        super().__init__()
        rope_dtype = resolve_rope_dtype(rope_dtype)
        self.config = config
        self.trunk = VisionTrunk(config, rope_dtype)
        self.visual_proj = None
        if config.train_clip:
            in_dim = config.vision_embed_dim if config.vision_bottleneck_ae_only else config.vision_feature_bottleneck
            self.visual_proj = Linear(in_dim, config.text_embed_dim, bias=False)
            self._init_text_tower(config)
        self.pixel_decoder = PixelDecoder(config, rope_dtype) if config.train_reconstruction else None

    def _init_text_tower(self, cfg: VTPConfig) -> None:
        width = cfg.text_embed_dim
        self.text_transformer = TextTransformer(cfg)
        # The table is filled by the checkpoint (or init_random_weights): skip nn.Embedding's own normal_ init,
        # which on the meta device goes through torch's decompositions and imports torch._dynamo (1.6 s).
        self.token_embedding = nn.Embedding(cfg.text_vocab_size, width, _weight=torch.empty(cfg.text_vocab_size, width))
        # Upstream sizes the table for an optional appended cls token it then never uses.
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.text_context_length + cfg.text_embed_cls, width))
        self.ln_final = LayerNorm(width)
        if cfg.text_proj_type == "none":
            self.text_projection = None
        elif cfg.text_proj_bias:
            self.text_projection = Linear(width, width)
        else:
            self.text_projection = nn.Parameter(torch.zeros(width, width))
        shape = [1] if cfg.nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.full(shape, cfg.init_logit_scale or math.log(1 / 0.07)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full(shape, float(cfg.init_logit_bias)))

    @classmethod
    def from_pretrained(
        cls, path: str, rope_dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
    ) -> VTPModel:
        """Load an upstream checkpoint directory (or a model spec such as ``random:vtp-small``) strictly."""
        return load_model(path, rope_dtype=rope_dtype, device=device).model

    # ----------------------------------------------------------------------------------- precision

    def to_precision(self, dtype: torch.dtype) -> VTPModel:
        """Cast the matmul weights (linear, conv, embeddings) to ``dtype``; norms, RoPE periods,
        cls token and logit scale stay float32, and so does the residual stream."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.to(dtype)
        for block in getattr(self, "text_transformer", nn.Module()).modules():
            if hasattr(block, "in_proj_weight"):
                block.in_proj_weight.data = block.in_proj_weight.data.to(dtype)
                block.in_proj_bias.data = block.in_proj_bias.data.to(dtype)
        if isinstance(getattr(self, "text_projection", None), nn.Parameter):
            self.text_projection.data = self.text_projection.data.to(dtype)
        return self

    @property
    def rope_dtype(self) -> torch.dtype:
        return self.trunk.rope_embed.dtype

    # ------------------------------------------------------------------------------ the VTP verbs

    def encode(self, image: Tensor) -> EncodeOutput:
        """One trunk pass -> latents (B, C, h, w) and the normalized CLIP image embedding."""
        tokens = self.trunk(image)
        latents = self._latents(tokens, image)
        clip = F.normalize(self._clip_head(tokens), dim=-1) if self.visual_proj is not None else None
        return EncodeOutput(latents=latents, clip_image_feature=clip)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> normalized images (B, 3, 16h, 16w)."""
        return self.get_latents_decoded_images(latents)

    def _latents(self, tokens: Tensor, image: Tensor) -> Tensor:
        h, w = image.shape[-2] // self.trunk.patch_size, image.shape[-1] // self.trunk.patch_size
        patches = self.trunk.bottleneck(tokens[:, 1:])
        return patches.transpose(1, 2).reshape(len(patches), -1, h, w)

    def _clip_head(self, tokens: Tensor) -> Tensor:
        if self.visual_proj is None:
            raise RuntimeError("this checkpoint has no CLIP head (train_clip is false)")
        cfg = self.config
        feature = tokens[:, 0] if cfg.vision_clip_feat == "cls" else tokens[:, 1:].mean(dim=1)
        if not cfg.vision_bottleneck_ae_only:
            feature = self.trunk.bottleneck(feature)
        return self.visual_proj(feature).float()

    # ------------------------------------------------------------------ upstream's public methods

    def get_last_layer_feature(self, image: Tensor, use_bottleneck: bool = False) -> dict[str, Tensor]:
        """Normed last-layer features: ``{"cls_token": (B, D), "patch_tokens": (B, N, D)}``."""
        tokens = self.trunk(image)
        if use_bottleneck:
            tokens = self.trunk.bottleneck(tokens)
        return {"cls_token": tokens[:, 0], "patch_tokens": tokens[:, 1:]}

    def get_intermediate_layers_feature(
        self,
        image: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the blocks indexed by ``n``), without the bottleneck."""
        depth = len(self.trunk.blocks)
        indices = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        _, outputs = self.trunk.run_blocks(image, keep=indices)
        if len(outputs) != len(indices):
            raise ValueError(f"block indices {list(n)} are not all in 0..{depth - 1} (or repeat)")
        if norm:
            outputs = [self.trunk.norm(out) for out in outputs]
        classes = [out[:, 0] for out in outputs]
        patches = [out[:, 1:] for out in outputs]
        if reshape:
            h, w = image.shape[-2] // self.trunk.patch_size, image.shape[-1] // self.trunk.patch_size
            patches = [p.reshape(len(p), h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        return tuple(zip(patches, classes, strict=True)) if return_class_token else tuple(patches)

    def get_clip_image_feature(self, image: Tensor, normalize: bool = True) -> Tensor:
        """CLIP image embedding (B, D)."""
        feature = self._clip_head(self.trunk(image))
        return F.normalize(feature, dim=-1) if normalize else feature

    def get_reconstruction_latents(self, image: Tensor) -> Tensor:
        """Bottlenecked patch tokens as (B, C, H/16, W/16)."""
        return self._latents(self.trunk(image), image)

    def get_latents_decoded_images(self, latents: Tensor) -> Tensor:
        """Decode latents (B, C, h, w) to normalized images (B, 3, 16h, 16w)."""
        if self.pixel_decoder is None:
            raise RuntimeError("this checkpoint has no pixel decoder (train_reconstruction is false)")
        c = self.config.vision_feature_bottleneck
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"expected latents of shape (B, {c}, h, w), got {tuple(latents.shape)}")
        return self.pixel_decoder(latents)

    def get_clip_text_feature(self, text: Tensor, normalize: bool = True) -> Tensor:
        """CLIP text embedding (B, D) of token ids (B, L), L <= context length."""
        if not self.config.train_clip:
            raise RuntimeError("this checkpoint has no text tower (train_clip is false)")
        length = text.shape[1]
        if length > len(self.positional_embedding):
            raise ValueError(f"text has {length} tokens, over the context length {len(self.positional_embedding)}")
        x = self.token_embedding(text).float() + self.positional_embedding[:length]
        x = self.ln_final(self.text_transformer(x, causal=not self.config.text_no_causal_mask))
        x = self._pool_text(x, text)
        if isinstance(self.text_projection, nn.Parameter):
            x = x @ self.text_projection.to(x.dtype)
        elif self.text_projection is not None:
            x = self.text_projection(x).float()
        return F.normalize(x, dim=-1) if normalize else x

    def _pool_text(self, x: Tensor, text: Tensor) -> Tensor:
        pool = self.config.text_pool_type
        if pool == "first":
            return x[:, 0]
        if pool == "last":
            return x[:, -1]
        if pool == "argmax":  # the end-of-text token has the largest id
            return x[torch.arange(len(x), device=x.device), text.argmax(dim=-1)]
        return x

    def get_clip_logits(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """(image-to-text logits, text-to-image logits), scaled and biased as trained."""
        logits = self.clip_logits(self.get_clip_image_feature(image), self.get_clip_text_feature(text))
        return logits, logits.T

    def clip_logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Image-to-text logits ``(N, M)`` of normalized features: ``exp(logit_scale) * cos [+ logit_bias]``."""
        logits = self.logit_scale.float().exp() * image_features.float() @ text_features.float().T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.float()
        return logits


# ------------------------------------------------------------------------------------------- building

_ROPE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_rope_dtype(rope_dtype: str | torch.dtype) -> torch.dtype:
    """``float32`` (portable, the default) or ``bfloat16`` (upstream's) as a torch dtype."""
    if isinstance(rope_dtype, torch.dtype):
        if rope_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"rope_dtype must be float32 or bfloat16, got {rope_dtype}")
        return rope_dtype
    try:
        return _ROPE_DTYPES[rope_dtype]
    except KeyError:
        raise ValueError(f"rope_dtype must be 'float32' or 'bfloat16', got {rope_dtype!r}") from None


def load_model(spec: str, rope_dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model a spec names (checkpoint directory or ``random:...``), in eval mode, float32, on ``device``."""
    rope = resolve_rope_dtype(rope_dtype)
    source = read_spec(spec)
    return LoadedModel(build_model(source, lambda config: VTPModel(config, rope_dtype=rope), device), source)
