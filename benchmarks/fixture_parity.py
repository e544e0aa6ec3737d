"""The adapted model on a device against upstream VTP's own outputs: the parity fixture, run where the tests cannot.

The test suite checks the model against ``tests/fixtures/vtp-tiny/reference.safetensors`` (upstream's outputs for
fixed inputs, made with upstream's code; ``tests/fixtures/README.md``) on the CPU only. This script runs the same
comparisons on any device and precision, Ray-free, for a short lease on a GPU or NPU machine:

- RoPE in bfloat16 (upstream's behaviour) against every upstream output: CLIP image feature (normalized and raw),
  latents, decoded images, for both inputs (one not square); CLIP text feature and logits from the token ids;
- RoPE in float32 (vtp-ray's default) against the fixture's float32-RoPE outputs.

Each line prints the error measure of the tests (max |actual - expected| / max |expected|) and its verdict against
the tests' tolerance (2e-5) in fp32; lower precisions against ``--max-error`` (default 5%: the logits carry the
logit scale).

    PYTHONPATH=. python3 benchmarks/fixture_parity.py --device cuda --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vtp_ray.device import resolve_device, resolve_precision
from vtp_ray.model import load_model

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vtp-tiny"
FP32_TOL = 2e-5  # the tests' tolerance: RoPE precision alone moves the outputs by about 3e-4


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float().cpu(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.inference_mode()
def outputs(model, ref: dict[str, torch.Tensor], device: torch.device, rope: str) -> dict[str, tuple]:
    """(actual, expected) per fixture output for one RoPE mode."""
    on = {key: value.to(device) for key, value in ref.items()}
    found = {}
    if rope == "bfloat16":
        for s in ("s0", "s1"):
            x = on[f"{s}.image"]
            found[f"{s}.clip_image_feature"] = model.get_clip_image_feature(x)
            found[f"{s}.clip_image_feature_raw"] = model.get_clip_image_feature(x, normalize=False)
            found[f"{s}.latents"] = model.get_reconstruction_latents(x)
            found[f"{s}.decoded"] = model.get_latents_decoded_images(on[f"{s}.latents"])
        found["text.clip_text_feature"] = model.get_clip_text_feature(on["text.ids"])
        found["text.logits_s0"] = model.get_clip_logits(on["s0.image"], on["text.ids"])[0]
    else:
        x = on["s0.image"]
        found["s0.rope_fp32.clip_image_feature"] = model.get_clip_image_feature(x)
        found["s0.rope_fp32.latents"] = model.get_reconstruction_latents(x)
        found["s0.rope_fp32.decoded"] = model.get_latents_decoded_images(on["s0.rope_fp32.latents"])
    return {key: (value, ref[key]) for key, value in found.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32", help="comma list, e.g. fp32,bf16")
    p.add_argument("--max-error", type=float, default=0.05, help="the limit below fp32")
    args = p.parse_args()
    device = resolve_device(args.device)
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    failed = 0
    for precision in args.precisions.split(","):
        dtype = resolve_precision(precision)
        limit = FP32_TOL if dtype == torch.float32 else args.max_error
        for rope in ("bfloat16", "float32"):
            model = load_model(str(FIXTURE), rope_dtype=rope, device=device).model
            model.to_precision(dtype)
            print(f"{device} {precision}, RoPE in {rope}, against upstream's outputs (limit {limit:g}):")
            for key, (actual, expected) in outputs(model, ref, device, rope).items():
                error = rel_err(actual, expected)
                failed += error >= limit
                print(f"  {key:<34}{error:>11.2e}  {'pass' if error < limit else 'FAIL'}")
    print("PASS" if not failed else f"FAIL ({failed} outputs over their limit)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
