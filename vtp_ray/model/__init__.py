"""Our own inference implementation of MiniMax's VTP tokenizer (loads the published checkpoints unchanged)."""

from .checkpoint import CheckpointError, LoadedModel, ModelSpec, load_model, read_spec
from .config import VTPConfig
from .vtp import EncodeOutput, VTPModel

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
