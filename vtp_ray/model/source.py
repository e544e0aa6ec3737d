"""Model specs, resolved without torch (``checkpoint`` loads the weights they name).

A *model spec* names a model everywhere in vtp-ray (CLI, Serve config, Ray Data jobs):

- a local checkpoint directory as upstream publishes it: ``config.json`` + ``model.safetensors``
  (or a sharded ``model.safetensors.index.json``);
- ``random:vtp-small`` (a bundled preset) or ``random:/path/to/config.json``: seeded random weights
  with real hyper-parameters, for smoke tests and benchmarks. Always reported as random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import VTPConfig

__all__ = ["DOWNLOAD_HINT", "PRESETS", "RANDOM_PREFIX", "CheckpointError", "ModelSpec", "read_spec"]

RANDOM_PREFIX = "random:"
PRESETS = ("vtp-small",)
DOWNLOAD_HINT = (
    "Download a published checkpoint into a local directory, e.g. with Hugging Face's CLI (pip install "
    "huggingface_hub)\n"
    "  hf download MiniMaxAI/VTP-Small-f16d64 --local-dir ./VTP-Small-f16d64\n"
    "or ModelScope's (pip install modelscope)\n"
    "  modelscope download --model MiniMax/VTP-Small-f16d64 --local_dir ./VTP-Small-f16d64\n"
    "and pass that directory; or try everything with seeded random weights: --model random:vtp-small"
)


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model its config describes."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec and its hyper-parameters (no weights read yet)."""

    spec: str  # absolute checkpoint path, or the random: spec as given
    config: VTPConfig
    random_weights: bool

    @property
    def name(self) -> str:
        return f"{self.spec} (random weights)" if self.random_weights else Path(self.spec).name


def read_spec(spec: str) -> ModelSpec:
    """Resolve a model spec and read its config; a missing checkpoint says how to get one."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return ModelSpec(spec, _random_config(spec[len(RANDOM_PREFIX) :]), random_weights=True)
    directory = Path(spec).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"model path {spec!r} does not exist.\n{DOWNLOAD_HINT}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{spec!r} has no config.json: not a VTP checkpoint directory.\n{DOWNLOAD_HINT}")
    # Absolute, so that Ray workers (whatever their working directory) load the same checkpoint.
    resolved = str(directory.resolve())
    return ModelSpec(resolved, VTPConfig.from_json_file(directory / "config.json"), random_weights=False)


def _random_config(name: str) -> VTPConfig:
    if name in PRESETS:
        text = resources.files("vtp_ray.model").joinpath("presets", f"{name}.json").read_text(encoding="utf-8")
        return VTPConfig.from_dict(json.loads(text))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return VTPConfig.from_json_file(path)
    raise ValueError(f"unknown random model {name!r}: use one of {list(PRESETS)} or a path to a config.json")
