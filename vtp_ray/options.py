"""Choices shared by the CLI, the Serve config and the pipelines, in one torch-free place."""

from __future__ import annotations

#: Precision of the matmul weights; norms, RoPE and softmax statistics always stay float32.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Where RoPE's sin/cos are computed: float32 (portable, default) or bfloat16 (upstream, bit for bit).
ROPE_DTYPES = ("float32", "bfloat16")
#: How an image becomes the square model input: ADM center crop (training's) or a plain resize.
CROPS = ("center", "resize")
#: Whether a replica runs its image verbs through ``torch.compile``: never, always (where it can work), or where it
#: is known to pay (``vtp_ray.compiled.plan_compile`` says which and why).
COMPILE_MODES = ("off", "on", "auto")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ``ValueError`` listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {list(PRECISIONS)}")
    return precision


def check_compile_mode(mode: str) -> str:
    """``mode`` if it is one of ``COMPILE_MODES``, else a ``ValueError`` listing them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}: use one of {list(COMPILE_MODES)}")
    return mode
