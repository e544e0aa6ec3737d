"""Ray Serve application for VTP: a FastAPI ingress in front of dynamically batched model deployments.

``serve run serve_config.yaml`` (or ``serve deploy``) builds it with ``deployments.app:build_app``. Three rooms: the
HTTP API (``api``), the Open Inference Protocol (``oip``) and the model deployment (``model``), over one settings
tree (``settings``); ARCHITECTURE.md lists every module. Importing the package does not import torch: only the model
replicas load it. Nor does it import the app (FastAPI, Ray Serve): a job on an app needs only
``deployments.model.protocol``, and every process of its model stage would otherwise import the whole app (1.3 s).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["AppArgs", "AppSettings", "build_app", "compose_app"]

_FROM = {"build_app": ".app", "compose_app": ".app", "AppSettings": ".settings", "AppArgs": ".settings"}


def __getattr__(name: str) -> Any:
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(_FROM[name], __name__)
    return module.AppSettings if name == "AppArgs" else getattr(module, name)  # AppArgs: AppSettings' earlier name
