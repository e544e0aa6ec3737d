"""What feeds a job on an idle Serve app: blocks in flight and preprocess tasks, side by side in one run.

One local Ray runs the app as ``shared_fleet.py`` starts it (one model replica with every core). A ``tokenize`` job on
the app runs over ``--images`` images with each setting in turn: the blocks it keeps in flight
(``ServeTarget.calls``, ``--serve-calls``; default one per replica) and its preprocess tasks at once
(``preprocess_concurrency``, ``--preprocess-concurrency``; default on an app: a quarter of the cluster's CPUs). For
each it prints the job's images/s (whole run, and once warm) and, from ``/v1/model``'s ``work``, the batch model
calls the app made and their mean duration. Where the warm rate follows the preprocess tasks and not the blocks in
flight, the job is fed by its preprocessing, not held back by the app::

    PYTHONPATH=. python benchmarks/served_job_feed.py                 # tiny model, 64 px, 8,000 images
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import httpx
import ray
from _common import write_images
from ray import serve
from shared_fleet import batch_call_ms, batching_args, job, start_app

from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.served import ServeTarget

ROOT = Path(__file__).resolve().parents[1]
APP = "feed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "vtp-tiny"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-work-size", type=int, default=32)
    parser.add_argument("--calls", default="1,2,3", help="blocks in flight to compare (preprocessing at default)")
    parser.add_argument("--concurrency", default="1,2,4", help="preprocess tasks to compare (blocks: default)")
    args = parser.parse_args()

    url = start_app(args.model, args.size, batching_args(args), APP)
    base = PipelineSpec(model=args.model, preprocessing=Preprocessing(size=args.size), progress=False,
                        serve=ServeTarget(APP))  # fmt: skip
    runs = [
        (f"blocks in flight {c}", replace(base, serve=ServeTarget(APP, calls=int(c)))) for c in args.calls.split(",")
    ]
    runs += [
        (f"preprocess tasks {c}", replace(base, preprocess_concurrency=int(c))) for c in args.concurrency.split(",")
    ]

    def model_info() -> dict:
        return httpx.get(f"{url}/v1/model", timeout=30).json()

    with tempfile.TemporaryDirectory() as tmp:
        images, few = Path(tmp) / "images", Path(tmp) / "few"
        write_images(images, args.images, sides=(args.size, args.size * 3 // 2))
        write_images(few, 200, seed=2, sides=(args.size, args.size * 3 // 2))
        job(few, Path(tmp) / "warm-up", base)  # starts the driver's Ray workers
        print(f"\n{args.model} at {args.size} px, {args.images} images, batch_work_size {args.batch_work_size}")
        print(f"{'setting':22s} {'img/s':>7s} {'warm':>7s} {'batch calls':>11s} {'ms each':>8s}")
        for name, spec in runs:
            before = model_info()
            run = job(images, Path(tmp) / "out", spec)
            after = model_info()
            calls = after["work"]["batch"]["calls"] - before["work"]["batch"]["calls"]
            each = batch_call_ms(before, after)
            print(f"{name:22s} {run['images_per_s']:7.0f} {run['warm']:7.0f} {calls:11d} {each:8.1f}", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
