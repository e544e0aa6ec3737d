"""The CLIP text side's speed, each figure next to its reference measured in the same run.

1. ``/v1/embed-text`` at ``--clients`` concurrent HTTP clients (each sending ``--texts`` texts per request, one
   request at a time) next to ``VTPReplica.embed_text`` called directly on batches of the size the Serve replica
   forms (``--max-batch-size`` requests): texts/s and their ratio (goal >= 0.85). The direct rate is measured
   right before and after the HTTP run and averaged, so drift in background load shifts both sides alike.
2. ``vtp-ray eval --task zero-shot`` images/s next to ``vtp-ray tokenize`` on the same generated images (same
   model, size, batch size, one CPU replica); the zero-shot figure includes building the text classifier.

    PYTHONPATH=. python benchmarks/text_throughput.py                         # random:vtp-small
    PYTHONPATH=. python benchmarks/text_throughput.py --model tests/fixtures/vtp-tinytext --images 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from _common import NO_RATE_LIMITS, write_images
from ray import serve

from deployments import AppSettings, compose_app
from vtp_ray import VTPReplica
from vtp_ray.pipeline import PipelineSpec, Preprocessing


def texts_for(request: int, count: int) -> list[str]:
    return [f"a photo of object number {request * count + i}, seen from the side." for i in range(count)]


def direct_rate(replica: VTPReplica, args: argparse.Namespace, rounds: int = 6) -> float:
    """Texts/s of ``embed_text`` on batches of ``max_batch_size`` requests' texts."""
    batch = args.max_batch_size * args.texts
    started = time.perf_counter()
    for r in range(rounds):
        replica.embed_text(texts_for(r, batch))
    return rounds * batch / (time.perf_counter() - started)


async def http_rate(url: str, args: argparse.Namespace) -> tuple[float, float]:
    """Texts/s and mean x-vtp-batch-size of ``--requests`` requests from ``--clients`` clients."""
    sizes: list[int] = []
    counter = iter(range(args.requests))

    async def client(http: httpx.AsyncClient) -> None:
        for n in counter:
            response = await http.post("/v1/embed-text", json={"texts": texts_for(n, args.texts)})
            response.raise_for_status()
            sizes.append(int(response.headers["x-vtp-batch-size"]))

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await http.post("/v1/embed-text", json={"texts": ["warm-up"]})
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        seconds = time.perf_counter() - started
    return len(sizes) * args.texts / seconds, float(np.mean(sizes))


def serve_part(args: argparse.Namespace) -> None:
    replica = VTPReplica(args.model, "cpu", cpu_threads=os.cpu_count(), warmup_size=0)
    direct_rate(replica, args, rounds=1)  # tokenizer and kernels warm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = AppSettings(
        model=args.model, placement="cpu", image_size=64, max_batch_size=args.max_batch_size, rate_limits=NO_RATE_LIMITS
    )
    serve.run(compose_app(app, ray_actor_options={"num_cpus": os.cpu_count()}), name="text-bench", route_prefix="/")
    before = direct_rate(replica, args)
    served, mean_batch = asyncio.run(http_rate(f"http://127.0.0.1:{port}", args))
    after = direct_rate(replica, args)
    direct = (before + after) / 2
    print(
        f"/v1/embed-text, {args.clients} clients x {args.texts} texts: {served:.1f} texts/s (mean batch "
        f"{mean_batch:.1f} requests) | VTPReplica.embed_text direct at {args.max_batch_size * args.texts} texts: "
        f"{direct:.1f} texts/s ({before:.1f} before, {after:.1f} after) | ratio {served / direct:.2f} (goal >= 0.85)"
    )
    serve.shutdown()
    ray.shutdown()


def pipeline_part(args: argparse.Namespace) -> None:
    from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset
    from vtp_ray.pipeline.jobs.zeroshot import zero_shot_dataset

    spec = PipelineSpec(
        model=args.model,
        preprocessing=Preprocessing(args.size),
        batch_size=args.batch_size,
        replicas=1,
        resources="cpu",
        progress=False,
    )
    with tempfile.TemporaryDirectory(prefix="vtp-text-bench-") as tmp:
        images = Path(tmp) / "images"
        write_images(images, args.images)  # 10 class directories
        names = Path(tmp) / "classes.txt"
        names.write_text("".join(f"class number {i}\n" for i in range(10)))
        started = time.perf_counter()
        summary = tokenize_dataset(str(images), str(Path(tmp) / "tokens"), spec)
        tokenize_rate = summary.rows / (time.perf_counter() - started)
        started = time.perf_counter()
        report = zero_shot_dataset(
            str(images), Path(tmp) / "zs", spec, classnames=names, template_set=args.template_set
        )
        zero_shot_rate = report["counts"]["evaluated"] / (time.perf_counter() - started)
    print(
        f"{args.images} images at {args.size} px, batch {args.batch_size}, 1 CPU replica: zero-shot eval "
        f"{zero_shot_rate:.2f} images/s ({report['templates']} templates x 10 classes) | tokenize "
        f"{tokenize_rate:.2f} images/s | ratio {zero_shot_rate / tokenize_rate:.2f} (wall clock, Ray start included)"
    )
    print(json.dumps({"zero_shot_top1": report["metrics"]["top1"], "random_weights": report["random_weights"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, default=4, help="texts per request")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template-set", default="imagenet", choices=["imagenet", "default"])
    parser.add_argument("--skip", choices=["serve", "pipeline"], help="run only the other part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.skip != "serve":
        serve_part(args)
    if args.skip != "pipeline":
        pipeline_part(args)


if __name__ == "__main__":
    main()
