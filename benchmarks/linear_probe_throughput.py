"""Throughput of the linear probe: its training steps against the trunk's feature extraction alone, and the fast
mode's total time against upstream's protocol, in one run.

1. In this process, on the same pre-decoded images (uint8, ``--size`` square, on the replica's device), warm:
   - features: ``heads.probe_features`` of a ``VTPReplica`` alone (the trunk pass every training step needs);
   - training: the same features, then one SGD step of every head (upstream's 26 heads: ``--n-last-blocks`` x
     13 learning rates, ``--classes`` outputs), as a Ray Train worker runs it.
   Their ratio is what the heads cost on top of the trunk (goal: training >= 0.8 x features); the two alternate,
   one batch each per round, and the medians are compared.
2. On a local Ray, on generated JPEGs (300-400 px, ``_common.write_images``) in 10 class folders: ``linear_probe``
   with upstream's protocol
   (decoding and augmentation in Ray Data tasks, the ``TorchTrainer`` worker, checkpoints, validation); its
   training rate (the last epoch's images/s, start-up excluded) stands beside the in-process rates. Then the
   fast mode on the same images and settings: both total times (start-up, extraction, training, validation).

::

    PYTHONPATH=. python benchmarks/linear_probe_throughput.py --model random:vtp-small --batch-size 32

Numbers move between machines and with other load: compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import write_images


def in_process(args: argparse.Namespace, settings: object) -> dict[str, float]:
    """Images/s of the features alone and of the training steps, on the same pre-decoded images."""
    import torch

    from vtp_ray import VTPReplica
    from vtp_ray.probe.heads import LinearHeads, make_optimizer, make_schedule, probe_features, train_step
    from vtp_ray.probe.worker import resolve_probe_precision

    precision = resolve_probe_precision(args.precision, torch.device("cpu"))
    replica = VTPReplica(args.model, "cpu", precision, warmup_size=0)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (args.batch_size, args.size, args.size, 3), dtype=np.uint8))
    targets = torch.from_numpy(rng.integers(0, args.classes, args.batch_size))
    specs = settings.heads(workers=1)
    heads = LinearHeads(specs, replica.model.config.vision_embed_dim, args.classes)
    optimizer = make_optimizer(heads, specs, settings)
    schedule = make_schedule(optimizer, 10**6)
    max_blocks = settings.max_blocks

    def extract() -> None:
        probe_features(replica.model, images, max_blocks)

    def step() -> None:
        train_step(heads, optimizer, schedule, probe_features(replica.model, images, max_blocks), targets).item()

    for _ in range(args.warmup):
        extract()
        step()
    # Alternated, one batch each per round, medians: a machine whose load drifts slows both alike.
    seconds: dict[str, list[float]] = {"features": [], "training": []}
    for _ in range(args.steps):
        for name, work in (("features", extract), ("training", step)):
            started = time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - started)
    rates: dict[str, float | str] = {name: args.batch_size / float(np.median(s)) for name, s in seconds.items()}
    rates["precision"] = precision
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where native), fp32, bf16")
    parser.add_argument("--n-last-blocks", default="1,4")
    parser.add_argument("--classes", type=int, default=1000, help="heads' outputs in part 1 (ImageNet's 1000)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="generated training images, 10 classes (val: a quarter)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--epoch-length", type=int, default=4)
    parser.add_argument("--skip-pipeline", action="store_true", help="only part 1")
    args = parser.parse_args()

    from vtp_ray.probe import ProbeSettings

    settings = ProbeSettings(
        epochs=args.epochs,
        epoch_length=args.epoch_length,
        batch_size=args.batch_size,
        n_last_blocks=tuple(int(n) for n in args.n_last_blocks.split(",")),
        size=args.size,
        resize_size=args.size * 8 // 7,
        precision=args.precision,
        log_every=args.epoch_length,
    )
    rates = in_process(args, settings)
    print(f"model {args.model}, {args.size} px, batch {args.batch_size}, precision {rates['precision']}, "
          f"{len(settings.heads(1))} heads x {args.classes} classes")  # fmt: skip
    print(f"features alone (pre-decoded images):  {rates['features']:8.2f} images/s")
    print(f"training steps (same images):          {rates['training']:8.2f} images/s  "
          f"({rates['training'] / rates['features']:.2f} x features; goal >= 0.8)")  # fmt: skip
    if args.skip_pipeline:
        return

    import ray

    from vtp_ray.pipeline import PipelineSpec, Preprocessing
    from vtp_ray.probe.job import linear_probe

    spec = PipelineSpec(model=args.model, resources="cpu", preprocessing=Preprocessing(size=args.size), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "train", args.images, seed=0)
        write_images(root / "val", max(10, args.images // 4), seed=1)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        try:
            reports = {}
            for mode in ("protocol", "fast"):
                run = replace(settings, mode=mode)
                reports[mode] = linear_probe([str(root / "train")], [str(root / "val")], root / mode, spec, run)
        finally:
            ray.shutdown()
    last = reports["protocol"]["history"][-1]
    rate = last["images_per_s"]
    print(f"with decoding + augmentation (Ray Data tasks, Train worker, last epoch, 10 classes): {rate:8.2f} "
          f"images/s ({rate / rates['features']:.2f} x features alone)")  # fmt: skip
    protocol, fast = reports["protocol"]["seconds"], reports["fast"]["seconds"]
    print(f"total time, {args.epochs} x {args.epoch_length} iterations: protocol {protocol:.1f}s, fast mode "
          f"{fast:.1f}s ({protocol / fast:.2f} x faster; extraction "
          f"{reports['fast']['feature_extraction']['seconds']:.1f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
