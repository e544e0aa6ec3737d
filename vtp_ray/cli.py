"""The ``vtp-ray`` command: info, reconstruct, verify, bench (and tokenize, for datasets)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

log = logging.getLogger("vtp_ray")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _csv(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(item) for item in text.split(",") if item]


def add_model_args(parser: argparse.ArgumentParser, precision: str = "fp32", required: bool = True) -> None:
    """The flags every model-running command shares."""
    parser.add_argument(
        "--model",
        default=os.environ.get("VTP_MODEL"),
        required=required and "VTP_MODEL" not in os.environ,
        help="checkpoint directory, or random:vtp-small for seeded random weights (env VTP_MODEL)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (npu > cuda > cpu; in a Ray job: the device its placement gives), npu:N, cuda:N or cpu",
    )
    parser.add_argument("--precision", default=precision, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--rope-dtype", default="float32", choices=["float32", "bfloat16"])


# ------------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .device import describe_devices

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

        ray.init(address=address, logging_level=logging.WARNING)
        info["ray_cluster"] = {
            "resources": ray.cluster_resources(),
            "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------ reconstruct


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import DecodeLimits, ImageDecodeError, preprocess, to_png_bytes
    from .replica import VTPReplica

    replica = VTPReplica(args.model, args.device, args.precision, args.rope_dtype, warmup_size=0)
    if replica.info["random_weights"]:
        print(f"note: {replica.info['model']}: reconstructions are noise", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = DecodeLimits(max_pixels=args.max_pixels)
    inputs, failures = [], 0
    for path in args.images:
        try:
            inputs.append((Path(path), preprocess(path, args.size, args.crop, limits)))
        except (ImageDecodeError, OSError) as e:
            failures += 1
            print(f"{path}: skipped: {e}", file=sys.stderr)
    for start in range(0, len(inputs), args.batch_size):
        chunk = inputs[start : start + args.batch_size]
        originals = np.stack([image for _, image in chunk])
        for (path, original), recon in zip(chunk, replica.reconstruct(originals), strict=True):
            target = out / f"{path.stem}.png"
            target.write_bytes(to_png_bytes(np.concatenate([original, recon], axis=1) if args.side_by_side else recon))
            mse = np.mean((original.astype(np.float64) - recon.astype(np.float64)) ** 2)
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
            print(f"{path} -> {target}  PSNR {psnr:.2f} dB")
    print(f"{len(inputs)} reconstructed, {failures} failed ({replica.info['model']}, {replica.info['device']})")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    thresholds = {"img_feat": args.max_error, "latents": args.max_error, "reconstruction": args.max_error}
    report = verify(
        args.model, args.device, args.precision, args.rope_dtype, args.batch, args.size, args.seed, thresholds
    )
    print(report.format())
    return 0 if report.passed else 1


# ------------------------------------------------------------------------------------------ bench


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import VERBS, bench, format_rows

    verbs = args.verbs or VERBS
    rows = bench(args.model, args.device, args.precisions, args.batch_sizes, args.size, verbs, args.warmup, args.runs)
    if args.json:
        print(json.dumps([{**vars(r), "ms_per_image": r.ms_per_image, "images_per_s": r.images_per_s} for r in rows]))
    else:
        print(format_rows(rows))
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    from .device import DeviceUnavailableError
    from .model import CheckpointError

    return (FileNotFoundError, ValueError, DeviceUnavailableError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtp-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, devices and (when connected) Ray cluster resources")
    p.add_argument("--address", help="Ray cluster to query (default: env RAY_ADDRESS; none: local facts only)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reconstruct", help="encode and decode image files; write PNGs")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output directory")
    add_model_args(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--crop", choices=["center", "resize"], default="center")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--side-by-side", action="store_true", help="write input and reconstruction side by side")
    p.add_argument("--max-pixels", type=int, default=89_478_485)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("verify", help="accuracy of a device/precision against cpu fp32 on seeded inputs")
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-error", type=float, default=0.01, help="pass when every normalized max error is below")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="latency and throughput of encode/decode/tokenize/reconstruct")
    add_model_args(p)
    p.add_argument("--precisions", type=_csv(str), default=["fp32"], help="comma list, e.g. fp32,bf16")
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="comma list, e.g. 1,8,32")
    p.add_argument("--verbs", type=_csv(str), help="comma list of encode,decode,tokenize,reconstruct (default: all)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(func=cmd_bench)

    from .tokenize import add_cli as add_tokenize

    add_tokenize(sub)
    from .evaluate import add_cli as add_eval

    add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except _user_errors() as e:  # a wrong flag or input: one clear line, no traceback
        print(f"vtp-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
