"""``vtp-ray info | reconstruct | verify | bench``: commands that run a model in this process, without Ray."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from ..images import ImageLimits
from ..options import CROPS
from .args import add_model_args, csv

RANDOM_NOTE = "RANDOM weights: outputs are noise"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model commands to the ``vtp-ray`` command's subparsers."""
    p = sub.add_parser("info", help="versions, devices and (when connected) Ray cluster resources")
    p.add_argument("--address", help="Ray cluster to query (default: env RAY_ADDRESS; none: local facts only)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reconstruct", help="encode and decode image files; write PNGs")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output directory")
    add_model_args(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--crop", choices=CROPS, default="center")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction side by side")
    p.add_argument("--max-pixels", type=int, default=ImageLimits.max_pixels)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("verify", help="accuracy of a device/precision against cpu fp32 on seeded inputs")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-error", type=float, default=0.01, help="pass when every normalized max error is below")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="latency and throughput of encode/decode/reconstruct/embed")
    add_model_args(p)
    p.add_argument("--precisions", type=csv(str), default=["fp32"], help="comma list, e.g. fp32,bf16")
    p.add_argument("--batch-sizes", type=csv(int), default=[1, 8], help="comma list, e.g. 1,8,32")
    p.add_argument("--verbs", type=csv(str), help="comma list of encode,decode,reconstruct,embed (default: all)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no plan, estimate or progress lines on stderr"
    )
    p.set_defaults(func=cmd_bench)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..device import describe_devices

    info: dict[str, object] = {
        "vtp_ray": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_npu": _version("torch-npu") or _version("torch_npu"),
        "ray": _version("ray"),
        "devices": describe_devices(),
    }
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        hint = "(start one with `ray start --head`, or unset RAY_ADDRESS)"
        _check_reachable(address, hint)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConnectionError(f"no Ray cluster found at {address!r} {hint}: {e}") from e
        info["ray_cluster"] = {
            "resources": ray.cluster_resources(),
            "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


def _check_reachable(address: str, hint: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when a ``host:port`` address has nothing listening."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # auto, local, ray://...: Ray's own lookup
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise ConnectionError(f"no Ray cluster found at {address!r} {hint}: {e}") from e


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from ..images import ImageLoadError, preprocess, to_png_bytes
    from ..metrics import psnr
    from ..replica import VTPReplica

    replica = VTPReplica(
        args.model,
        args.device,
        args.precision,
        args.rope_dtype,
        warmup_size=args.size if args.compile != "off" else 0,
        compile=args.compile,
        compile_cache=args.compile_cache,
        compile_max_batch=args.batch_size,
        cuda_graphs=args.cuda_graphs,
    )
    if not replica.compile_ready:
        print(f"compiling for {args.size} px images (the first time takes minutes; cached)", file=sys.stderr)
        replica.wait_compiled()
    note = f"  ({RANDOM_NOTE})" if replica.info.random_weights else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = ImageLimits(max_pixels=args.max_pixels)
    inputs, failures = [], 0
    for path in args.images:
        try:
            inputs.append((Path(path), preprocess(path, args.size, args.crop, limits)))
        except (ImageLoadError, OSError) as e:
            failures += 1
            print(f"{path}: skipped: {e}", file=sys.stderr)
    for start in range(0, len(inputs), args.batch_size):
        chunk = inputs[start : start + args.batch_size]
        originals = np.stack([image for _, image in chunk])
        recons = replica.reconstruct(originals)
        for (path, original), recon, value in zip(chunk, recons, psnr(originals, recons), strict=True):
            target = out / f"{path.stem}.png"
            target.write_bytes(to_png_bytes(np.concatenate([original, recon], axis=1) if args.side_by_side else recon))
            print(f"{path} -> {target}  PSNR {value:.2f} dB{note}")
    print(f"{len(inputs)} reconstructed, {failures} failed ({replica.info.model}, {replica.info.device}){note}")
    return 1 if failures else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..verify import verify

    thresholds = {"img_feat": args.max_error, "latents": args.max_error, "reconstruction": args.max_error}
    report = verify(
        args.model,
        args.device,
        args.precision,
        args.rope_dtype,
        args.batch,
        args.size,
        args.seed,
        thresholds,
        compile=args.compile,
        compile_cache=args.compile_cache,
        cuda_graphs=args.cuda_graphs,
    )
    print(report.format())
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import VERBS, bench, format_rows

    verbs = args.verbs or VERBS
    rows = bench(
        args.model,
        args.device,
        args.precisions,
        args.batch_sizes,
        args.size,
        verbs,
        args.warmup,
        args.runs,
        compile=args.compile,
        compile_cache=args.compile_cache,
        cuda_graphs=args.cuda_graphs,
        progress=(lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    else:
        print(format_rows(rows))
    return 0
