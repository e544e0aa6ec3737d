"""Fast preprocessing: load + crop cost per image, the exact ADM path against draft-mode JPEG loading, and their
pixel difference (``--fast-preprocess``, ``Preprocessing(fast=True)``).

Photo-like JPEGs (octaves of smooth noise: detail at every scale; quality 90) at ImageNet-like and camera sizes,
for the model sizes 128, 256 and 512. ``preprocess(..., draft=True)`` decodes a JPEG at the largest reduced scale
(1/2, 1/4, 1/8) whose short side stays >= 2 x size; the rest is the exact ADM crop::

    PYTHONPATH=. python benchmarks/fast_preprocess.py --repeats 5
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from vtp_ray.images import preprocess

SHAPES = [(375, 500), (768, 1024), (1536, 2048), (3000, 4000)]


def photo_jpeg(height: int, width: int, seed: int = 0) -> bytes:
    """A JPEG of photo-like content: octaves of upsampled noise, detail at every scale."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float64)
    for octave in range(1, 8):
        step = 2**octave
        coarse = rng.integers(0, 256, (max(height // step, 2), max(width // step, 2), 3), dtype=np.uint8)
        out += np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float64)
    buffer = io.BytesIO()
    Image.fromarray((out / 7).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def ms_per_call(data: bytes, size: int, draft: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):  # the best of several: this machine's CPUs are shared
        started = time.perf_counter()
        preprocess(data, size, draft=draft)
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="128,256,512")
    args = parser.parse_args()
    print(f"{'image':>10} {'size':>5} {'exact ms':>9} {'draft ms':>9} {'speed-up':>8} {'mean |d|':>9} {'max |d|':>8}")
    for height, width in SHAPES:
        data = photo_jpeg(height, width)
        for size in (int(s) for s in args.sizes.split(",")):
            exact = preprocess(data, size).astype(np.int16)
            difference = np.abs(preprocess(data, size, draft=True).astype(np.int16) - exact)
            exact_ms = ms_per_call(data, size, False, args.repeats)
            draft_ms = ms_per_call(data, size, True, args.repeats)
            print(
                f"{width:>4}x{height:<5} {size:>5} {exact_ms:9.2f} {draft_ms:9.2f} {exact_ms / draft_ms:7.2f}x "
                f"{difference.mean():9.3f} {difference.max():8d}"
            )


if __name__ == "__main__":
    main()
