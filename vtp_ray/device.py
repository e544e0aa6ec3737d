"""Device and precision adaptation: Ascend NPU (torch_npu), CUDA and CPU behind one small API.

``torch_npu`` is imported lazily and only when an NPU is asked for or probed; without it, NPUs are
simply not available. Inside a Ray actor, Ray narrows ``ASCEND_RT_VISIBLE_DEVICES`` /
``CUDA_VISIBLE_DEVICES`` to the devices it assigned, so index 0 is always the actor's own device.
"""

from __future__ import annotations

import functools
import os
import random
import resource
from types import ModuleType

import numpy as np
import torch

from .options import check_precision

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceUnavailableError(RuntimeError):
    """The device that was asked for does not exist here."""


@functools.cache
def npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    return bool(torch.npu.is_available())


def available_device_types() -> list[str]:
    """Device types usable in this process, preferred first."""
    kinds = []
    if npu_available():
        kinds.append("npu")
    if torch.cuda.is_available():
        kinds.append("cuda")
    kinds.append("cpu")
    return kinds


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (npu > cuda > cpu), ``npu[:N]``, ``cuda[:N]`` or ``cpu`` -> a checked ``torch.device``."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        kind = available_device_types()[0]
        return torch.device(kind, 0) if kind != "cpu" else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        if spec.split(":")[0] != "npu":
            raise ValueError(f"unknown device {spec!r}: use auto, npu[:N], cuda[:N] or cpu") from None
        device = None  # torch only parses "npu" once torch_npu is imported
    if spec.startswith("npu"):
        if not npu_available():
            raise DeviceUnavailableError(
                f"device {spec!r} asked for, but no NPU is usable here: install CANN and the matching torch_npu "
                "(pip install 'vtp-ray[npu]') on an Ascend host, or use --device auto/cpu"
            )
        device = torch.device(spec)
        count = torch.npu.device_count()
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {spec!r} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
    elif device.type == "cpu":
        return torch.device("cpu")
    else:
        raise ValueError(f"unsupported device {spec!r}: use auto, npu[:N], cuda[:N] or cpu")
    index = device.index or 0
    if index >= count:
        raise DeviceUnavailableError(f"device {spec!r} asked for, but only {count} {device.type} device(s) are visible")
    return torch.device(device.type, index)


def resolve_precision(precision: str) -> torch.dtype:
    """``fp32 | bf16 | fp16`` -> the dtype matmul weights are kept in."""
    return _DTYPES[check_precision(precision)]


def cpu_has_fast_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` in hardware (AVX512-BF16 / AMX); without it, PyTorch falls back to
    scalar kernels that are far slower than float32."""
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes.get(dtype, ()))


def device_module(device: torch.device) -> ModuleType | None:
    """``torch.cuda`` or ``torch.npu`` for an accelerator, None for the CPU."""
    if device.type == "cpu":
        return None
    return getattr(torch, device.type)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    module = device_module(device)
    if module is not None:
        module.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA and NPU generators too when present


def memory_stats(device: torch.device) -> dict[str, int]:
    """Bytes in use: the allocator's figures on accelerators, the process peak RSS on the CPU."""
    module = device_module(device)
    if module is None:
        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return {
        "allocated_bytes": int(module.memory_allocated(device)),
        "reserved_bytes": int(module.memory_reserved(device)),
        "peak_allocated_bytes": int(module.max_memory_allocated(device)),
    }


def describe_devices() -> dict[str, object]:
    """What this process can see, for ``vtp-ray info`` and ``/v1/model``."""
    info: dict[str, object] = {"types": available_device_types(), "cpu_threads": torch.get_num_threads()}
    for var in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            info[var] = os.environ[var]
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if npu_available():
        info["npu"] = [torch.npu.get_device_name(i) for i in range(torch.npu.device_count())]
    return info
