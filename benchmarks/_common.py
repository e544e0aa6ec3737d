"""What the benchmark scripts share: synthetic image sets and loopback helpers. Benchmarks import this, never the
tests' helpers (``tests/`` is the test suite's own)."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(
    directory: Path, count: int, seed: int = 0, sides: tuple[int, int] = (300, 400), blur: int = 16
) -> list[Path]:
    """``count`` JPEGs in 10 class folders, ``sides`` px per side: colour noise upsampled ``blur`` times, like
    out-of-focus photos."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (height // blur, width // blur, 3), dtype=np.uint8))
        path = directory / f"class_{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


#: ``rate_limits`` of the apps that measure throughput: every client of a benchmark comes from one address, which
#: the default budgets (docs/operations.md, "Rate limits") would hold to 5 model requests a second.
NO_RATE_LIMITS = {"model": {"rate": 0}, "cheap": {"rate": 0}}


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enable_direct_ingress() -> int:
    """Serve's direct ingress, for the Ray this process starts next: each ingress replica also serves HTTP on a port
    of its own, from the range set here (with one ingress replica, the first). Returns that port."""
    port = free_port()
    os.environ.update(
        RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 100),
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1",  # no load balancer to tell: a quick stop (default 30 s)
    )
    return port


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 ``(H, W, 3)`` array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
