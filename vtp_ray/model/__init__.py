"""Our own inference implementation of MiniMax's VTP tokenizer (loads the published checkpoints unchanged).

Model specs and configs (``source``, ``config``) import without torch, so that drivers and the Serve ingress can
read what a model is without loading torch; the module and its loading (``vtp``, ``checkpoint``) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import VTPConfig
from .source import CheckpointError, ModelSpec, read_spec

_WITH_TORCH = {"EncodeOutput": "vtp", "VTPModel": "vtp", "load_model": "vtp", "LoadedModel": "checkpoint"}

__all__ = ["CheckpointError", "ModelSpec", "VTPConfig", "read_spec", *_WITH_TORCH]


def __getattr__(name: str) -> Any:
    if name in _WITH_TORCH:
        return getattr(importlib.import_module(f".{_WITH_TORCH[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
