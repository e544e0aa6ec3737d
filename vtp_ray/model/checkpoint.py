"""Strict checkpoint loading: a resolved ``ModelSpec`` (``source``) filled into any module, or seeded random
weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import VTPConfig
from .source import DOWNLOAD_HINT, CheckpointError, ModelSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with the facts that must travel with everything it produces."""

    model: nn.Module
    source: ModelSpec

    @property
    def spec(self) -> str:
        return self.source.spec

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def random_weights(self) -> bool:
        return self.source.random_weights

    @property
    def config_digest(self) -> str:
        return self.source.config.digest()


def build_model(
    source: ModelSpec, make: Callable[[VTPConfig], nn.Module], device: str | torch.device = "cpu"
) -> nn.Module:
    """``make(config)``, with the spec's weights loaded strictly (or seeded random ones), in eval mode on ``device``.

    Model-agnostic: the caller says how to build the module, this function only fills it.
    """
    if source.random_weights:
        model = make(source.config)
        init_random_weights(model, seed=0)
        log.warning("model %s has RANDOM weights: outputs are meaningless beyond speed and plumbing", source.spec)
    else:
        with torch.device("meta"):  # skip the constructor's random init: every tensor comes from the file
            model = make(source.config)
        load_state_strict(model, read_safetensors(Path(source.spec)))
    return model.eval().to(device)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` lists."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json.\n{DOWNLOAD_HINT}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers / short files
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return tensors


def load_state_strict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` become ``model``'s weights, in the module's dtypes; any missing, unexpected or mis-shaped tensor is
    an error naming it.

    A module built on the meta device takes the tensors themselves (``assign``): no second copy of the weights, and
    no materializing of empty ones first (``to_empty`` goes through torch's meta decompositions, whose first use
    imports sympy: half a second of every replica's start).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label} ({len(items)}): {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json; " + "; ".join(problems))
    on_meta = any(v.is_meta for v in expected.values())
    if on_meta:
        tensors = {k: v.to(expected[k].dtype) for k, v in tensors.items()}  # a no-op where the dtypes agree
    model.load_state_dict(tensors, strict=True, assign=on_meta)
    # A non-persistent buffer would be left uninitialized by a meta-device build (upstream's NaN
    # text-mask pitfall); this model keeps none, and this check keeps it that way.
    persistent = {name for name, _ in model.named_buffers()} & set(expected)
    stray = {name for name, _ in model.named_buffers()} - persistent
    if stray:
        raise CheckpointError(f"non-persistent buffers would stay uninitialized: {sorted(stray)}")


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random weights with sane activation scales (the training init, roughly)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if (p.ndim <= 1 and leaf in ("weight", "gamma")) or name.startswith("logit_"):
            continue  # norm weights (ones), layer scales, logit scale/bias keep their constructor values
        if leaf == "bias" or leaf.endswith("_bias"):
            p.zero_()
        elif name == "positional_embedding":
            p.normal_(0.0, 0.01, generator=g)
        elif name == "text_projection" or leaf == "in_proj_weight":
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        else:  # a clipped normal: trunc_normal_ is ~15x slower on VTP-Small's 167M parameters
            p.normal_(0.0, 0.02, generator=g).clamp_(-0.04, 0.04)
