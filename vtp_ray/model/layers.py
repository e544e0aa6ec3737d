"""Building blocks of VTP: norms, feed-forwards, axial RoPE, attention and transformer blocks.

Parameter names follow the published checkpoints, so ``load_state_dict`` maps them one to one.

Precision policy (see ``VTPModel.to_precision``): matmul weights may be bfloat16/float16 while the
residual stream, norms, RoPE and the softmax statistics stay float32. ``Linear`` therefore casts its
input to its weight's dtype; everything it returns is added back onto a float32 stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """``nn.Linear`` that accepts input of any float dtype (cast to the weight's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution stored as upstream stores it, applied to token rows (..., C) as the linear map it is."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled (upstream's order)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """The trunk's and decoder's norm kinds: ``rmsnorm`` (eps 1e-5), ``layernorm`` (1e-6), ``layernormbf16`` (1e-5)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=1e-5)
    if kind == "layernorm":
        return LayerNorm(dim, eps=1e-6)
    if kind == "layernormbf16":
        return LayerNorm(dim, eps=1e-5)
    raise ValueError(f"unknown norm kind {kind!r}")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden)
        self.w2 = Linear(dim, hidden)
        self.w3 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.w1.weight.dtype)
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def make_ffn(kind: str, dim: int, ratio: float) -> nn.Module:
    """``mlp`` or ``swiglu[32|64|128]``; SwiGLU's hidden width is 2/3 of the MLP's, rounded up to 8/32/64/128."""
    hidden = int(dim * ratio)
    if kind == "mlp":
        return Mlp(dim, hidden)
    if kind.startswith("swiglu"):
        align = int(kind[len("swiglu") :] or 8)
        d = int(hidden * 2 / 3)
        return SwiGLU(dim, d + (-d % align))
    raise ValueError(f"unknown ffn kind {kind!r}")


class AxialRoPE(nn.Module):
    """Axial 2D rotary embedding on a patch grid (DINOv3 style, no learned weights).

    Each head of width ``D`` is rotated by angles ``2*pi*coord/period`` with ``D/4`` periods for the row
    coordinate and ``D/4`` for the column coordinate; coordinates are patch centres normalized to
    [-1, 1] per axis. Tokens before the grid (the cls token) get the identity rotation (sin 0, cos 1),
    which leaves them unchanged without slicing or concatenating.

    ``dtype`` is the precision of the whole RoPE computation: bfloat16 reproduces upstream exactly
    (it rounds q and k to bfloat16 as well); float32 is the device-portable choice.
    """

    def __init__(self, dim: int, num_heads: int, base: float = 100.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        head_dim = dim // num_heads
        # Built on the CPU even under a meta-device build: meta arange pays a multi-second one-off import.
        periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32, device="cpu") / (head_dim // 2))
        # Stored in bfloat16 by upstream; loading keeps the stored values, computing uses `dtype`.
        self.register_buffer("periods", periods.to(torch.bfloat16), persistent=True)
        self.dtype = dtype
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def sincos(self, h: int, w: int, prefix: int = 0) -> tuple[Tensor, Tensor]:
        """(signed sin, cos) of shape (prefix + h*w, head_dim) in ``self.dtype``, cached per grid."""
        if torch.compiler.is_compiling():
            # Computed inside a compiled graph (a few thousand sin/cos): guards on the cache dict would fail, and
            # force recompiles, whenever an eager call of another grid size adds to it.
            return self._compute(h, w, prefix)
        key = (h, w, prefix, self.dtype, self.periods.device)
        if key not in self._cache:
            # Normal tensors even when first asked for under inference_mode, so that a later call with
            # autograd enabled can still use the cached tables.
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = self._compute(h, w, prefix)
        return self._cache[key]

    def _compute(self, h: int, w: int, prefix: int) -> tuple[Tensor, Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        coords_h = torch.arange(0.5, h, **dd) / h
        coords_w = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(self.dtype)[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        sin, cos = torch.sin(angles), torch.cos(angles)
        sin[:, : sin.shape[1] // 2].neg_()  # the sign of rotate_half, folded into the table (see rotate)
        if prefix:
            sin = torch.cat([sin.new_zeros(prefix, sin.shape[1]), sin])
            cos = torch.cat([cos.new_ones(prefix, cos.shape[1]), cos])
        return sin, cos

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # tables live on the old device/dtype
        return super()._apply(fn, recurse)

    @staticmethod
    def rotate(x: Tensor, signed_sin: Tensor, cos: Tensor) -> Tensor:
        """``x * cos + rotate_half(x) * sin``, computed in the tables' dtype, returned in x's dtype.

        With ``rotate_half(x) = cat(-x2, x1)``, the sign lives in the cached table instead
        (``signed_sin = cat(-sin1, sin2)``), which saves a negation pass; every product is rounded
        exactly as upstream rounds it, so bfloat16 RoPE stays bit-faithful.
        """
        xr = x.to(signed_sin.dtype)
        x1, x2 = xr.chunk(2, dim=-1)
        return (xr * cos + torch.cat([x2, x1], dim=-1) * signed_sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional per-head qk RMSNorm and RoPE."""

    def __init__(self, dim: int, num_heads: int, use_qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim, bias=True)
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim) if use_qk_norm else None
        self.k_norm = RMSNorm(head_dim) if use_qk_norm else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = AxialRoPE.rotate(q, *rope), AxialRoPE.rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float,
        ffn: str,
        norm: str,
        layerscale: float | None,
        use_qk_norm: bool,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = SelfAttention(dim, num_heads, use_qk_norm)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = make_norm(norm, dim)
        self.mlp = make_ffn(ffn, dim, mlp_ratio)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# CLIP text tower (OpenCLIP layout: nn.MultiheadAttention-style in_proj, c_fc/c_proj MLP)


class TextAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter layout, causal or not."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        b, n, c = x.shape
        qkv = F.linear(x.to(self.in_proj_weight.dtype), self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class TextMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = Linear(dim, hidden)
        self.c_proj = Linear(hidden, dim)
        self.quick_gelu = quick_gelu

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.c_proj(h)


class TextBlock(nn.Module):
    """OpenCLIP residual attention block (LayerNorm eps 1e-5, optional layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ls_init: float | None, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(dim)
        self.attn = TextAttention(dim, num_heads)
        self.ls_1 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()
        self.ln_2 = LayerNorm(dim)
        self.mlp = TextMlp(dim, int(dim * mlp_ratio), quick_gelu)
        self.ls_2 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))
