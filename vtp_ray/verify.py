"""Accuracy of a device/precision against the CPU float32 reference, the way the seed checked its NPU port.

The same seeded images go through the target (e.g. ``npu:0`` bf16) and through ``cpu`` fp32. For the
CLIP image feature, the latents and the reconstruction we report

- normalized max error  = max|target - ref| / max|ref|
- normalized mean error = mean|target - ref| / max|ref|
- and, for the reconstruction (de-normalized to [0, 1]), the PSNR of the target against the reference.

A check passes when every normalized max error is below its threshold (1% by default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .device import cpu_has_fast_low_precision, resolve_device, resolve_precision, seed_everything, synchronize
from .metrics import psnr
from .model import load_model
from .normalize import denormalize_to_unit, normalize

log = logging.getLogger(__name__)

OUTPUTS = ("img_feat", "latents", "reconstruction")


@dataclass
class Measure:
    name: str
    max_error: float
    mean_error: float
    threshold: float
    psnr_db: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_error < self.threshold


@dataclass
class VerifyReport:
    target: str
    reference: str = "cpu fp32"
    measures: list[Measure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.measures)

    def format(self) -> str:
        lines = [
            f"verify {self.target} against {self.reference}",
            f"{'output':<16}{'max err':>10}{'mean err':>10}{'limit':>8}{'PSNR dB':>9}  result",
        ]
        for m in self.measures:
            psnr_text = "" if m.psnr_db is None else f"{m.psnr_db:.2f}"
            lines.append(
                f"{m.name:<16}{m.max_error:>9.4%}{m.mean_error:>10.4%}{m.threshold:>8.2%}{psnr_text:>9}"
                f"  {'pass' if m.passed else 'FAIL'}"
            )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _compare(name: str, target: torch.Tensor, ref: torch.Tensor, threshold: float) -> Measure:
    diff = (target.float().cpu() - ref.float()).abs()
    scale = ref.float().abs().max().clamp_min(1e-12)
    return Measure(name, (diff.max() / scale).item(), (diff.mean() / scale).item(), threshold)


@torch.inference_mode()
def _run(model, images_u8: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    x = normalize(images_u8.to(device))
    out = model.encode(x)
    decoded = model.decode(out.latents)
    synchronize(device)
    image = denormalize_to_unit(decoded)  # before uint8 rounding, so PSNR is not capped by it
    return {"img_feat": out.clip_image_feature, "latents": out.latents, "reconstruction": image}


def verify(
    model: str,
    device: str = "auto",
    precision: str = "fp32",
    rope_dtype: str = "float32",
    batch: int = 2,
    size: int = 256,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
) -> VerifyReport:
    """Run seeded images on the target and on cpu fp32; compare img_feat, latents and reconstruction."""
    limits = {name: 0.01 for name in OUTPUTS} | (thresholds or {})
    target_device = resolve_device(device)
    dtype = resolve_precision(precision)
    if target_device.type == "cpu" and dtype != torch.float32 and not cpu_has_fast_low_precision(dtype):
        log.warning(
            "this CPU has no native %s matmuls (no AVX512-BF16/AMX): PyTorch emulates them, slowly; the numbers "
            "still say how %s rounding changes the outputs",
            precision,
            precision,
        )
    seed_everything(seed)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)

    reference = load_model(model, rope_dtype=rope_dtype, device="cpu").model
    ref = _run(reference, images, torch.device("cpu"))
    del reference
    target_model = load_model(model, rope_dtype=rope_dtype, device=target_device).model
    target_model.to_precision(dtype)
    out = _run(target_model, images, target_device)

    report = VerifyReport(target=f"{target_device} {precision} (rope {rope_dtype}, {batch}x{size}px, seed {seed})")
    for name in OUTPUTS:
        if out[name] is None:
            continue
        report.measures.append(_compare(name, out[name], ref[name], limits[name]))
    recon = out["reconstruction"].float().cpu().reshape(1, -1).numpy()
    report.measures[-1].psnr_db = float(psnr(ref["reconstruction"].reshape(1, -1).numpy(), recon, peak=1.0)[0])
    return report
