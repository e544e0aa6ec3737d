"""Throughput of ``vtp-ray tokenize`` against ``VTPReplica.encode`` alone, in one run on one machine.

Writes a few hundred JPEGs of 300-400 px (smooth random content, so they compress like photos) to a temporary
directory, then measures, at the same batch size and precision:

- replica: ``VTPReplica.encode`` on images already decoded and cropped (the model alone);
- pipeline: ``tokenize_dataset`` on the files (read, decode, crop, model, parquet), counted from its first output,
  i.e. once the replicas are loaded and warm.

The goal is a pipeline rate of at least 85% of the replica's::

    PYTHONPATH=. python benchmarks/tokenize_throughput.py --images 300 --batch-size 16 --precision fp32
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import write_images

GOAL = 0.85


class ReplicaRate:
    """``VTPReplica.encode`` images/s on pre-decoded batches (the model alone), measurable several times."""

    def __init__(self, args: argparse.Namespace, paths: list[Path]) -> None:
        from vtp_ray import VTPReplica
        from vtp_ray.images import preprocess

        # The pipeline's CPU replicas use every core too (worker.replica_cpu_threads).
        self.replica = VTPReplica(args.model, "cpu", args.precision, cpu_threads=os.cpu_count(), warmup_size=args.size)
        images = np.stack([preprocess(p, args.size) for p in paths[: args.batch_size * args.replica_batches]])
        self.batches = np.split(images, args.replica_batches)
        self.replica.encode(self.batches[0])

    def measure(self) -> float:
        started = time.perf_counter()
        for batch in self.batches:
            self.replica.encode(batch)
        return sum(len(b) for b in self.batches) / (time.perf_counter() - started)


def pipeline_rate(args: argparse.Namespace, directory: Path, output: Path) -> dict:
    """``tokenize_dataset`` on the files: its run statistics (``stats.json``'s ``last_run``)."""
    from vtp_ray.pipeline import PipelineSpec, Preprocessing
    from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset

    spec = PipelineSpec(
        model=args.model,
        precision=args.precision,
        preprocessing=Preprocessing(args.size),
        batch_size=args.batch_size,
        replicas=args.replicas,
        resources="cpu",
        progress=False,
    )
    summary = tokenize_dataset(str(directory), str(output), spec)
    assert summary.rows == args.images and summary.missing == 0, summary.line()
    return summary.stats["last_run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-batches", type=int, default=4, help="batches timed for the replica-only rate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="vtp-tokenize-bench-") as tmp:
        directory, output = Path(tmp) / "images", Path(tmp) / "out"
        started = time.perf_counter()
        paths = write_images(directory, args.images)
        print(f"{len(paths)} JPEGs written in {time.perf_counter() - started:.1f}s ({os.cpu_count()} CPUs)")

        # The model alone, before and after the pipeline: this machine's speed drifts (shared CPUs).
        model = ReplicaRate(args, paths)
        before = model.measure()
        print(f"replica  : {before:8.2f} images/s  (VTPReplica.encode on pre-decoded arrays, batch {args.batch_size})")

        import ray

        ray.init(address="local", logging_level=logging.WARNING)
        try:
            run = pipeline_rate(args, directory, output)
        finally:
            ray.shutdown()
        model_rate = run["processed"] / sum(run["replica_model_s"].values())
        print(
            f"pipeline : {run['warm_images_per_s']:8.2f} images/s  (tokenize_dataset once warm; "
            f"{run['images_per_s']:.2f} over the whole {run['seconds']:.0f}s run incl. Ray and model start-up)"
        )
        print(f"  inside : {model_rate:8.2f} images/s  (its replica's time in the model only, first batch included)")
        after = model.measure()
        print(f"replica  : {after:8.2f} images/s  (again, after the pipeline)")
        replica = (before + after) / 2
        ratio = run["warm_images_per_s"] / replica
        verdict = "meets" if ratio >= GOAL else "MISSES"
        print(
            f"ratio    : {ratio:8.3f}  pipeline / mean replica rate ({verdict} the {GOAL:.0%} goal; {args.model}, "
            f"{args.precision}, {args.images} images, load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
