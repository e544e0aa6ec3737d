"""Our own inference implementation of MiniMax's VTP tokenizer (loads the published checkpoints unchanged)."""

from .checkpoint import CheckpointError, LoadedModel, ModelSpec, read_spec
from .config import VTPConfig
from .vtp import EncodeOutput, VTPModel, load_model

__all__ = [
    "CheckpointError",
    "EncodeOutput",
    "LoadedModel",
    "ModelSpec",
    "VTPConfig",
    "VTPModel",
    "load_model",
    "read_spec",
]
