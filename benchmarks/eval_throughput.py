"""Throughput of ``vtp-ray eval`` next to ``vtp-ray tokenize`` on the same images, in one run on one Ray.

Writes JPEGs of 300-400 px to a temporary directory, then runs, one after the other on the same local Ray and
with the same model, precision, batch size and replicas:

- tokenize: ``tokenize_dataset`` (encode only, latents to parquet);
- eval: ``evaluate_dataset`` with PSNR and SSIM (encode + decode, metrics in the actor);
- eval+rFID: the same plus Inception v3 features of both images (random local weights: the cost, not the value).

Rates are inputs over the wall time of each call, replica start-up included (the same for all three)::

    PYTHONPATH=. python benchmarks/eval_throughput.py --images 64 --size 256 --model random:vtp-small
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from _common import write_images


def random_inception(path: Path) -> Path:
    from vtp_ray.metrics import save_random_fid_inception

    save_random_fid_inception(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--no-rfid", dest="rfid", action="store_false", help="skip the eval+rFID run")
    args = parser.parse_args()

    import ray

    from vtp_ray.pipeline import PipelineSpec, Preprocessing
    from vtp_ray.pipeline.jobs.evaluate import evaluate_dataset
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
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        write_images(root / "images", args.images)
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        try:
            rates: dict[str, float] = {}
            started = time.perf_counter()
            summary = tokenize_dataset(str(root / "images"), str(root / "tokens"), spec)
            rates["tokenize"] = summary.processed / (time.perf_counter() - started)
            runs = {"eval": {}}
            if args.rfid:
                runs["eval+rFID"] = {"inception_weights": random_inception(root / "inception.pt")}
            for name, extra in runs.items():
                started = time.perf_counter()
                report = evaluate_dataset(str(root / "images"), root / name, spec, **extra)
                rates[name] = report["counts"]["evaluated"] / (time.perf_counter() - started)
                assert report["counts"]["evaluated"] == args.images, report["counts"]
        finally:
            ray.shutdown()
    print(
        f"{args.images} images, {args.model} {args.precision}, {args.size}px, batch {args.batch_size}, "
        f"{args.replicas} CPU replica(s), ray {ray.__version__}"
    )
    for name, rate in rates.items():
        print(f"{name:<10} {rate:7.2f} images/s   {rate / rates['tokenize']:.2f}x tokenize")


if __name__ == "__main__":
    main()
