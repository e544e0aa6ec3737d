"""LightningDiT workflow speed, measured side by side in one run on one machine.

- tokenize: ``tokenize_dataset`` on the same ImageFolder tree as parquet (``--flip``) and as LightningDiT shards
  (``--format lightningdit``), warm images/s of each (from the first output on). Goal: shards >= 0.95x parquet.
- decode: ``decode_latents`` (``vtp-ray decode``: read stage, replica pool, PNGs) against ``VTPReplica.decode``
  alone on the same latents at the same batch size. Goal: >= 0.85x.

    PYTHONPATH=. python benchmarks/lightningdit_throughput.py --images 200 --batch-size 16
    PYTHONPATH=. python benchmarks/lightningdit_throughput.py --model tests/fixtures/vtp-tiny --size 64
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from _common import write_images

TOKENIZE_GOAL, DECODE_GOAL = 0.95, 0.85


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import ray

    from vtp_ray import VTPReplica
    from vtp_ray.pipeline import PipelineSpec, Preprocessing
    from vtp_ray.pipeline.jobs.decode import decode_latents
    from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset

    ray.init(address="local", logging_level=logging.WARNING)
    spec = PipelineSpec(
        args.model, device=args.device, preprocessing=Preprocessing(args.size), batch_size=args.batch_size,
        labels_from_dirs=True, progress=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "images", args.images)
        rates = {}
        for fmt in ("parquet", "lightningdit"):
            summary = tokenize_dataset(str(root / "images"), str(root / fmt), spec, flip=True, format=fmt)
            rates[fmt] = summary.stats["last_run"].get("warm_images_per_s", summary.images_per_s)
        ratio = rates["lightningdit"] / rates["parquet"]
        print(
            f"tokenize --flip, {args.images} images, batch {args.batch_size}: parquet {rates['parquet']:.1f} img/s, "
            f"lightningdit {rates['lightningdit']:.1f} img/s -> {ratio:.2f}x (goal >= {TOKENIZE_GOAL})"
        )

        rows = pq.read_table(root / "parquet" / "data", columns=["latents"])
        grid = args.size // 16
        latents = np.array(rows.column("latents").to_pylist(), np.float32).reshape(rows.num_rows, -1, grid, grid)
        np.save(root / "latents.npy", latents)
        replica = VTPReplica(args.model, device="cpu" if args.device == "auto" else args.device, warmup_size=0)
        replica.decode(latents[: args.batch_size])  # warm
        started = time.perf_counter()
        for i in range(0, len(latents), args.batch_size):
            replica.decode(latents[i : i + args.batch_size])
        direct = len(latents) / (time.perf_counter() - started)
        del replica
        summary = decode_latents([str(root / "latents.npy")], str(root / "pngs"), spec)
        # The job's whole run (actor start included) is what a user waits for; it is the conservative number.
        ratio = summary.images_per_s / direct
        print(
            f"decode {len(latents)} latents, batch {args.batch_size}: VTPReplica.decode {direct:.1f} img/s, "
            f"vtp-ray decode (to PNGs, whole run) {summary.images_per_s:.1f} img/s -> {ratio:.2f}x "
            f"(goal >= {DECODE_GOAL})"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
