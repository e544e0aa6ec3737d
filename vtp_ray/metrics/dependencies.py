"""Checking the optional packages of ``vtp-ray[eval]`` before any work starts."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

__all__ = ["EVAL_INSTALL", "METRICS", "MissingEvalDependencyError", "require_eval_dependencies"]

EVAL_INSTALL = "pip install 'vtp-ray[eval]'"
# metric -> (module to import, pip package) that it needs beyond torch and numpy.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "psnr": (),
    "ssim": (("torchmetrics", "torchmetrics"),),
    "lpips": (("torchvision", "torchvision"),),
    "rfid": (("torchvision", "torchvision"), ("pytorch_fid.inception", "pytorch-fid")),
}
METRICS = frozenset(_NEEDS)


class MissingEvalDependencyError(ImportError):
    """An optional package that a requested metric needs is not installed; the message gives the install line."""


def require_eval_dependencies(metrics: Iterable[str]) -> None:
    """Import what ``metrics`` (of ``psnr``, ``ssim``, ``lpips``, ``rfid``) need; one error naming all that is missing.

    For the driver, before it starts Ray. Raises ``MissingEvalDependencyError`` (an ``ImportError``) whose message
    ends with ``pip install 'vtp-ray[eval]'``, and ``ValueError`` for an unknown metric name.
    """
    metrics = set(metrics)
    if unknown := metrics - METRICS:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {sorted(METRICS)}")
    missing: dict[str, list[str]] = {}
    for metric in sorted(metrics):
        for module, package in _NEEDS[metric]:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.setdefault(package, []).append(metric)
    if missing:
        needs = "; ".join(f"{package} (for {', '.join(users)})" for package, users in missing.items())
        raise MissingEvalDependencyError(f"missing optional packages: {needs}. Install them with: {EVAL_INSTALL}")
