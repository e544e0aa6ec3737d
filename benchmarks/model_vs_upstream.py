"""The adapted model against upstream VTP, side by side in one run, on the same random VTP-Small weights.

    python benchmarks/model_vs_upstream.py --upstream /path/to/MiniMax-AI/VTP

``--upstream`` is a checkout of github.com/MiniMax-AI/VTP; it is imported only here, only for this
comparison, and needs its own dependencies (transformers, omegaconf, torchvision, ftfy, regex).
Without it the upstream columns are skipped. Goals (ratios, this machine class):

1. seed check (CLIP feature + latents + reconstruction, batch 1, fp32): >= 1.4x upstream's three calls
2. encode + decode, fp32, batch 8: >= 0.95x upstream
3. ``VTPReplica(precision="bf16").reconstruct``, batch 8: >= 70% of this machine's bf16 GEMM rate,
   with ``verify`` passing at bf16 against cpu fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from vtp_ray import VTPReplica
from vtp_ray.bench import gemm_flops_per_s, model_flops
from vtp_ray.device import cpu_has_fast_low_precision
from vtp_ray.model import load_model
from vtp_ray.normalize import normalize
from vtp_ray.verify import verify

CPU = torch.device("cpu")


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per function, runs interleaved so that machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def build_upstream(path: str, ours: torch.nn.Module) -> torch.nn.Module:
    sys.path.insert(0, path)
    from vtp.models.vtp_hf.configuration_vtp import VTPConfig as UpstreamConfig
    from vtp.models.vtp_hf.modeling_vtp import VTPModel as UpstreamModel

    fields = {k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
    upstream = UpstreamModel(UpstreamConfig(**fields)).eval()
    upstream.load_state_dict(ours.state_dict(), strict=True)  # same parameter names, one to one
    return upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="path to a checkout of MiniMax-AI/VTP")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    ours = load_model("random:vtp-small").model
    upstream = build_upstream(args.upstream, ours) if args.upstream else None
    flops = model_flops(ours.config)
    rng = np.random.default_rng(0)
    u8 = {b: rng.integers(0, 256, (b, 256, 256, 3), dtype=np.uint8) for b in (1, 8)}
    x = {b: normalize(torch.from_numpy(images)) for b, images in u8.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; VTP-Small random weights; 256 px")

    with torch.inference_mode():
        print("\n1. seed check: CLIP feature + latents + reconstruction, batch 1, fp32")
        fns = {"ours (encode + decode)": lambda: ours.decode(ours.encode(x[1]).latents)}
        if upstream is not None:
            fns["upstream (3 calls)"] = lambda: (
                upstream.get_clip_image_feature(x[1]),
                upstream.get_latents_decoded_images(upstream.get_reconstruction_latents(x[1])),
            )
        report(interleaved(fns, args.warmup, args.runs), baseline="upstream (3 calls)", goal=1.4, batch=1)

        print("\n2. encode + decode, batch 8, fp32")
        fns = {"ours": lambda: ours.decode(ours.get_reconstruction_latents(x[8]))}
        if upstream is not None:
            fns["upstream"] = lambda: upstream.get_latents_decoded_images(upstream.get_reconstruction_latents(x[8]))
        report(interleaved(fns, args.warmup, args.runs), baseline="upstream", goal=0.95, batch=8)

    print("\n3. bf16 on the CPU, batch 8: VTPReplica(precision='bf16').reconstruct")
    if not cpu_has_fast_low_precision(torch.bfloat16):
        fp32, bf16 = (gemm_flops_per_s(CPU, dtype, n=512) for dtype in (torch.float32, torch.bfloat16))
        print(
            f"   skipped: this CPU has no native bf16 matmul (no AVX512-BF16/AMX; capability "
            f"{torch.backends.cpu.get_cpu_capability()}): 512^3 GEMM fp32 {fp32 / 1e9:.1f} GFLOP/s, "
            f"bf16 {bf16 / 1e9:.2f} GFLOP/s. Goals 3 and 4 need a CPU with AVX512-BF16 or AMX."
        )
        return
    replica = VTPReplica("random:vtp-small", device="cpu", precision="bf16", warmup_size=0)
    fns = {"ours: replica bf16 reconstruct": lambda: replica.reconstruct(u8[8])}
    if upstream is not None:

        def upstream_bf16() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                upstream.get_latents_decoded_images(upstream.get_reconstruction_latents(x[8]))

        fns["upstream: bf16 autocast"] = upstream_bf16
    times = interleaved(fns, args.warmup, args.runs)
    rate = gemm_flops_per_s(CPU, torch.bfloat16, n=2048)
    per_image = flops["encode"] + flops["decode"]
    print(f"   encode + decode = {per_image / 1e9:.1f} GFLOP per image; bf16 2048^3 GEMM: {rate / 1e9:.0f} GFLOP/s")
    for name, seconds in times.items():
        achieved = 8 * per_image / seconds
        print(f"   {name:<34}{seconds * 1e3 / 8:8.1f} ms/image  {achieved / 1e9:6.0f} GFLOP/s  {achieved / rate:6.1%}")
    ours_share = 8 * per_image / times["ours: replica bf16 reconstruct"] / rate
    print(f"   goal >= 70% of the GEMM rate: {'met' if ours_share >= 0.70 else 'NOT met'} ({ours_share:.1%})")

    print("\n4. verify: bf16 on the CPU against cpu fp32 (same seeded input)")
    print("   " + verify("random:vtp-small", device="cpu", precision="bf16").format().replace("\n", "\n   "))


def report(times: dict[str, float], baseline: str, goal: float, batch: int) -> None:
    ours_name = next(name for name in times if name.startswith("ours"))
    for name, seconds in times.items():
        print(f"   {name:<34}{seconds * 1e3:8.1f} ms/batch {seconds * 1e3 / batch:8.1f} ms/image")
    if baseline in times:
        speedup = times[baseline] / times[ours_name]
        print(f"   speed-up vs upstream: {speedup:.2f}x (goal >= {goal}x: {'met' if speedup >= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
