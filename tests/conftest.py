from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "vtp-tiny"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs value (the fixtures' tolerance measure)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "reference.safetensors"))
