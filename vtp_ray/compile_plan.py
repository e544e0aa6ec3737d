"""Where compiling can work and pays (``plan_compile``), and where its artifacts persist (``use_compile_cache``).

The plan decides ``off | on | auto`` for a device and precision and names the backend: inductor on the CPU (which
needs a C++ compiler and Python's headers at run time) and on CUDA (triton kernels, no CUDA graphs), TorchAir on
Ascend (shipped with torch_npu); where none can work, eager with the reason. ``vtp_ray.compiled`` runs the plan.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import check_compile_mode

__all__ = [
    "COMPILE_CACHE_ENV",
    "CompilePlan",
    "cache_key",
    "cpu_has_matrix_engine",
    "find_cpp_compiler",
    "plan_compile",
    "torchair",
    "use_compile_cache",
]

#: Where compiled artifacts persist when no ``compile_cache`` is given.
COMPILE_CACHE_ENV = "VTP_COMPILE_CACHE"


@dataclass(frozen=True)
class CompilePlan:
    """Whether a replica compiles, with which backend, and why (also why not)."""

    mode: str
    enabled: bool
    backend: str | None  # "inductor" (CPU and CUDA), "torchair" (Ascend); None: eager
    reason: str


def plan_compile(mode: str, device: torch.device, dtype: torch.dtype) -> CompilePlan:
    """Decide ``off | on | auto`` for a device and precision.

    ``auto`` compiles where it is known to pay: bfloat16/float16 on an accelerator, or on a CPU with a matrix engine
    (AMX: bf16, AMX-FP16: fp16). There the GEMMs are fast and the eager ops around them (dtype copies, RoPE, norms,
    SwiGLU) are most of the time, which compiling fuses: VTP-Small bf16 reconstruct at batch 8 on an AMX Xeon, 92-102
    ms per image eager, 36 compiled. Without AMX the GEMMs are the time: on an AVX512-BF16 EPYC (no AMX) compiled
    bf16 ran at 0.85-1.07x of eager per verb (``benchmarks/compile_speed.py``), and fp32 at 1.00-1.16x here, 1.03x
    on the Xeon: not worth minutes of compiling, so ``auto`` stays eager there.
    """
    check_compile_mode(mode)
    if mode == "off":
        return CompilePlan(mode, False, None, "compile is off")
    low = dtype in (torch.bfloat16, torch.float16)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if mode == "auto":
        if device.type == "cpu" and not (low and cpu_has_matrix_engine(dtype)):
            why = "fp32 on a CPU" if not low else f"{name} on a CPU without AMX"
            return CompilePlan(mode, False, None, f"auto: eager ({why}: compiling is not known to pay)")
        if device.type != "cpu" and not low:
            return CompilePlan(mode, False, None, f"auto: eager (fp32 on {device.type}: compiling is not known to pay)")
    chosen = "auto: compiled" if mode == "auto" else "compile is on"
    if device.type == "npu":
        if torchair() is None:
            return CompilePlan(mode, False, None, "eager: TorchAir (torch_npu's torch.compile backend) does not import")
        return CompilePlan(mode, True, "torchair", f"{chosen} ({name} on npu, TorchAir graph mode)")
    if device.type == "cuda":
        if not _has_triton():
            return CompilePlan(mode, False, None, "eager: inductor on CUDA needs triton, which is not installed")
        return CompilePlan(mode, True, "inductor", f"{chosen} ({name} on cuda, inductor's triton kernels)")
    missing = _inductor_cpu_missing()
    if missing:
        return CompilePlan(mode, False, None, f"eager: inductor on the CPU needs {missing} at run time")
    return CompilePlan(mode, True, "inductor", f"{chosen} ({name} on the CPU)")


def cpu_has_matrix_engine(dtype: torch.dtype) -> bool:
    """Whether this CPU has AMX tiles for ``dtype`` (bf16: AMX-BF16, fp16: AMX-FP16)."""
    probe = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}.get(dtype)
    return bool(probe) and getattr(torch.cpu, probe, lambda: False)()


@functools.cache
def find_cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (its own probe where torch has it), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # torch without cpp_builder: look where inductor looks
        for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
            if name and shutil.which(name):
                return shutil.which(name)
        return None
    try:
        return shutil.which(get_cpp_compiler())
    except Exception:  # inductor raises its InvalidCxxCompiler when none runs
        return None


def _inductor_cpu_missing() -> str | None:
    """What inductor's CPU kernels need at run time and this machine lacks: a C++ compiler and Python's headers."""
    if find_cpp_compiler() is None:
        return "a C++ compiler (g++ or clang++; none found)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return f"Python's C headers (no Python.h in {sysconfig.get_paths()['include']}: install python3-dev)"
    return None


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def torchair():
    """TorchAir, shipped with torch_npu (imported after it), or None."""
    try:
        import torch_npu  # noqa: F401
        import torchair
    except Exception:
        return None
    return torchair


# ---------------------------------------------------------------------------------------- the cache


def cache_key(device: torch.device) -> str:
    """This machine class, as a directory name: compiled code is only valid for the torch, Python and CPU ISA (or
    accelerator) it was made for, and inductor's own keys do not name the CPU's vector ISA."""
    parts = [f"torch{torch.__version__}", f"py{sys.version_info.major}{sys.version_info.minor}", platform.machine()]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts += [torch.cuda.get_device_name(device), f"sm{major}{minor}"]
    elif device.type == "npu":
        parts.append(torch.npu.get_device_name(device.index or 0))
    else:
        get = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")
        parts.append(get())
        parts += [flag for flag, probe in _CPU_FLAGS if getattr(torch.cpu, probe, lambda: False)()]
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(parts)).lower()


_CPU_FLAGS = (("bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))


def use_compile_cache(root: str | os.PathLike | None, device: torch.device) -> Path:
    """Point inductor's cache (process-wide) at ``root/<cache_key>``; ``root``: the option, else env
    ``VTP_COMPILE_CACHE``, else ``<tmp>/vtp-ray-compile-<uid>`` (the machine's own, kept until /tmp is cleared)."""
    root = root or os.environ.get(COMPILE_CACHE_ENV) or Path(tempfile.gettempdir(), f"vtp-ray-compile-{os.getuid()}")
    path = Path(root).expanduser().resolve() / cache_key(device)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each compile
    return path
