"""Our own inference implementation of MiniMax's VTP tokenizer (loads the published checkpoints unchanged)."""

from .checkpoint import CheckpointError, LoadedModel, load_model
from .config import VTPConfig
from .vtp import EncodeOutput, VTPModel

__all__ = ["CheckpointError", "EncodeOutput", "LoadedModel", "VTPConfig", "VTPModel", "load_model"]
