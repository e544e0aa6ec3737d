"""Accuracy of a device/precision against the CPU float32 reference, the way the seed checked its NPU port.

The same seeded images go through the target (e.g. ``npu:0`` bf16) and through ``cpu`` fp32. For the
CLIP image feature, the latents and the reconstruction we report

- normalized max error  = max|target - ref| / max|ref|
- normalized mean error = mean|target - ref| / max|ref|
- and, for the reconstruction (de-normalized to [0, 1]), the PSNR of the target against the reference.

A check passes when every normalized max error is below its threshold (1% by default).

With ``compile`` the target runs its compiled graphs (``vtp_ray.compiled``), and the report adds the compiled
outputs against the eager ones of the same device and precision: the error compiling itself adds. On CUDA the
target's calls are then recorded as CUDA graphs, as a replica records them (``vtp_ray.cuda_graphs``), and the report
adds the replayed outputs against the direct ones, read after other images went through the same graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .compile_plan import plan_compile, use_compile_cache
from .compiled import CompiledModel, eager_units
from .cuda_graphs import CudaGraphs
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
    compile: str | None = None  # how the target ran: compiled graphs, or eager and why
    compile_failed: bool = False  # compiling was on, but not every graph ran compiled
    cuda_graphs: str | None = None  # what the CUDA graphs did (CUDA only)
    graphs_failed: bool = False  # a shape could not be recorded, or the calls did not replay

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.measures) and not self.compile_failed and not self.graphs_failed

    def format(self) -> str:
        width = max([len("output"), *(len(m.name) for m in self.measures)]) + 2
        lines = [
            f"verify {self.target} against {self.reference}",
            *([f"compile: {self.compile}"] if self.compile else []),
            *([f"cuda graphs: {self.cuda_graphs}"] if self.cuda_graphs else []),
            f"{'output':<{width}}{'max err':>10}{'mean err':>10}{'limit':>8}{'PSNR dB':>9}  result",
        ]
        for m in self.measures:
            psnr_text = "" if m.psnr_db is None else f"{m.psnr_db:.2f}"
            lines.append(
                f"{m.name:<{width}}{m.max_error:>10.4%}{m.mean_error:>10.4%}{m.threshold:>8.2%}{psnr_text:>9}"
                f"  {'pass' if m.passed else 'FAIL'}"
            )
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def _compare(name: str, target: torch.Tensor, ref: torch.Tensor, threshold: float) -> Measure:
    target, ref = target.float().cpu(), ref.float().cpu()  # ref: the CPU's, or the target's own eager outputs
    diff = (target - ref).abs()
    scale = ref.abs().max().clamp_min(1e-12)
    return Measure(name, (diff.max() / scale).item(), (diff.mean() / scale).item(), threshold)


@torch.inference_mode()
def _run(units, images_u8: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The outputs of ``units`` (the encoder and decoder graphs, eager or compiled) on ``images_u8``."""
    x = normalize(images_u8.to(device))
    latents, clip = units["encoder"](x)
    decoded = units["decoder"](latents)
    synchronize(device)
    image = denormalize_to_unit(decoded)  # before uint8 rounding, so PSNR is not capped by it
    return {"img_feat": clip, "latents": latents, "reconstruction": image}


def verify(
    model: str,
    device: str = "auto",
    precision: str = "fp32",
    rope_dtype: str = "float32",
    batch: int = 2,
    size: int = 256,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
    compile: str = "off",
    compile_cache: str | None = None,
    cuda_graphs: bool = True,
) -> VerifyReport:
    """Run seeded images on the target and on cpu fp32; compare img_feat, latents and reconstruction (and, when the
    target compiles, its compiled outputs against its eager ones; on CUDA with ``cuda_graphs``, its replayed
    outputs against its direct ones)."""
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

    plan = plan_compile(compile, target_device, dtype)
    reference = load_model(model, rope_dtype=rope_dtype, device="cpu").model
    ref = _run(eager_units(reference), images, torch.device("cpu"))
    del reference
    target_model = load_model(model, rope_dtype=rope_dtype, device=target_device).model
    target_model.to_precision(dtype)
    eager = _run(eager_units(target_model), images, target_device)
    out, compiled = eager, None
    if plan.enabled:
        cache = use_compile_cache(compile_cache, target_device)
        compiled = CompiledModel(target_model, target_device, plan, max_batch=batch, cache_dir=cache)
        compiled.warm(size)
        log.info("compiling the target's graphs for %dx%d px (a cold cache takes minutes)", size, size)
        compiled.wait_ready()
        out = _run({"encoder": compiled.encoder, "decoder": compiled.decoder}, images, target_device)

    mode = "compiled" if compiled else "eager"
    report = VerifyReport(
        target=f"{target_device} {precision} {mode} (rope {rope_dtype}, {batch}x{size}px, seed {seed})"
    )
    for name in OUTPUTS:
        if out[name] is None:
            continue
        report.measures.append(_compare(name, out[name], ref[name], limits[name]))
    recon = out["reconstruction"].float().cpu().reshape(1, -1).numpy()
    report.measures[-1].psnr_db = float(psnr(ref["reconstruction"].reshape(1, -1).numpy(), recon, peak=1.0)[0])
    if compiled is None:
        report.compile = None if compile == "off" else plan.reason
        report.compile_failed = compile == "on"
    else:
        status = compiled.status(compile)
        report.compile_failed = bool(status.failed) or status.compiled_calls < 2 or bool(status.eager_calls)
        report.compile = (
            f"{status.backend}, {len(status.graphs)} graphs in {status.compile_seconds:.1f}s, "
            f"{status.compiled_calls} compiled calls, eager calls {status.eager_calls or 0}"
            + (f", failed: {status.failed}" if status.failed else "")
        )
        _add_against(report, out, eager, "vs eager", limits)
    if cuda_graphs and target_device.type == "cuda":
        direct = {"encoder": compiled.encoder, "decoder": compiled.decoder} if compiled else eager_units(target_model)
        graphs = CudaGraphs(direct, target_device, max_batch=batch, settled=compiled.settled if compiled else None)
        units = {"encoder": graphs.encoder, "decoder": graphs.decoder}
        replayed = _run(units, images, target_device)
        _run(units, images.flip(1), target_device)  # other images through the same graphs: must not change those
        status = graphs.status("on (CUDA)")
        report.graphs_failed = bool(status.failed or status.direct_calls) or status.replays < 4
        report.cuda_graphs = f"{len(status.graphs)} recorded, {status.replays} replayed calls, direct calls " + (
            f"{status.direct_calls or 0}" + (f", failed: {status.failed}" if status.failed else "")
        )
        _add_against(report, replayed, out, "replayed vs direct", limits)
    if compiled is not None:
        compiled.close()
    return report


def _add_against(
    report: VerifyReport, out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], label: str, limits: dict
) -> None:
    for name in OUTPUTS:
        if out[name] is not None:
            measure = _compare(name, out[name], base[name], limits[name])
            measure.name = f"{name} {label}"
            report.measures.append(measure)
