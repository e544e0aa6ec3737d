"""``vtp-ray eval --task linear-probe``: its flags (the protocol's numbers) and the call into ``vtp_ray.probe``."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from ..probe.settings import MODES, UPSTREAM_LEARNING_RATES, ProbeSettings
from .args import csv, pipeline_spec

#: The flags ``eval`` shares with the other tasks whose defaults differ for the probe (upstream's numbers).
PROBE_DEFAULTS = {"size": 224, "batch_size": 128, "precision": "auto"}


class _DefaultInt(int):
    """An ``eval`` default that the probe replaces with its own (a flag given on the command line is a plain int)."""


class _DefaultStr(str):
    """The same for a text flag."""


def eval_defaults() -> dict[str, object]:
    """``eval``'s defaults for the flags in ``PROBE_DEFAULTS``: the other tasks' values, marked as defaults."""
    return {"size": _DefaultInt(256), "batch_size": _DefaultInt(32), "precision": _DefaultStr("fp32")}


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """The linear probe's flags on the ``eval`` parser; upstream's numbers are the defaults."""
    d = ProbeSettings()
    g = p.add_argument_group(
        "linear probe (--task linear-probe)",
        "upstream VTP's protocol by default: --size 224 (the crops), --batch-size 128 (per worker), --precision "
        "auto (bf16 where the device multiplies it natively, else fp32); --replicas: training workers (default "
        "one per NPU / GPU, else 1); --resources: per worker (auto, npu, gpu, cpu: half a CPU, or Ray resources)",
    )
    g.add_argument(
        "--train", nargs="+", metavar="INPUT", help="training images: class folders, manifests, shards, parquet"
    )
    g.add_argument("--val", nargs="+", metavar="INPUT", help="validation images, in the same form as --train")
    g.add_argument(
        "--probe-mode", choices=MODES, default="protocol",
        help="protocol: upstream's (a trunk pass per augmented image); fast: features extracted once without "
        "augmentation, heads trained on them (NOT upstream's protocol, much faster on a CPU)",
    )  # fmt: skip
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--epoch-length", type=int, default=d.epoch_length, help=f"iterations per epoch ({d.epoch_length})")
    g.add_argument(
        "--learning-rates", type=csv(float), default=list(UPSTREAM_LEARNING_RATES), metavar="LR1,LR2",
        help="base rates, each scaled by global batch / 256 (default upstream's 13, 1e-5 ... 0.1)",
    )  # fmt: skip
    g.add_argument(
        "--n-last-blocks", type=csv(int), default=list(d.n_last_blocks), metavar="N1,N2",
        help="heads read the class tokens of the last N blocks + the patch-token mean (default 1,4)",
    )  # fmt: skip
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum ({d.momentum})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"SGD weight decay ({d.weight_decay})")
    g.add_argument("--head-init-std", type=float, default=d.init_std, help=f"heads' weights N(0, STD) ({d.init_std})")
    g.add_argument(
        "--resize-size", type=int, default=d.resize_size,
        help=f"validation: short side resized to this, then the center --size crop ({d.resize_size})",
    )  # fmt: skip
    g.add_argument("--crop-scale", type=csv(float), default=list(d.crop_scale), metavar="LOW,HIGH",
                   help="RandomResizedCrop's area fraction range (0.08,1.0)")  # fmt: skip
    g.add_argument("--crop-ratio", type=csv(float), default=list(d.crop_ratio), metavar="LOW,HIGH",
                   help="RandomResizedCrop's aspect ratio range (3/4, 4/3)")  # fmt: skip
    g.add_argument("--seed", type=int, default=d.seed, help="heads' init, pass order, augmentation (0)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help=f"shards / parquet / stored features: rows mixed per worker ({d.shuffle_buffer})")  # fmt: skip
    g.add_argument(
        "--log-every", type=int, default=d.log_every, help=f"iterations between progress lines ({d.log_every})"
    )
    g.add_argument("--num-classes", type=int, help="shards / parquet: class indices are below this (default 1000)")
    g.add_argument(
        "--max-failures", type=int, default=3,
        help="worker failures Ray Train recovers from, each from the latest checkpoint (3; -1: no limit)",
    )  # fmt: skip
    g.add_argument("--overwrite", action="store_true", help="delete the run in --output instead of resuming it")


def task_defaults(args: argparse.Namespace) -> None:
    """For the probe, upstream's ``--size``, ``--batch-size``, ``--precision`` where they were not given; for the
    other tasks, the marked defaults become plain values again (they travel to Ray workers)."""
    for name, probe_value in PROBE_DEFAULTS.items():
        value = getattr(args, name)
        if isinstance(value, _DefaultInt):
            setattr(args, name, probe_value if args.task == "linear-probe" else int(value))
        elif isinstance(value, _DefaultStr):
            setattr(args, name, probe_value if args.task == "linear-probe" else str(value))


def probe_settings(args: argparse.Namespace) -> ProbeSettings:
    """The ``ProbeSettings`` of the flags."""
    if len(args.crop_scale) != 2 or len(args.crop_ratio) != 2:
        raise ValueError("--crop-scale and --crop-ratio take two numbers: LOW,HIGH")
    return ProbeSettings(
        epochs=args.epochs,
        epoch_length=args.epoch_length,
        batch_size=args.batch_size,
        learning_rates=tuple(args.learning_rates),
        n_last_blocks=tuple(args.n_last_blocks),
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        init_std=args.head_init_std,
        size=args.size,
        resize_size=args.resize_size,
        crop_scale=tuple(args.crop_scale),
        crop_ratio=tuple(args.crop_ratio),
        seed=args.seed,
        shuffle_buffer=args.shuffle_buffer,
        log_every=args.log_every,
        mode=args.probe_mode,
        precision=args.precision,
    )


def run_probe(args: argparse.Namespace) -> int:
    """``eval --task linear-probe``: prints every head's top-1, then the summary line (or the report as JSON)."""
    from ..pipeline.report import summary_line
    from ..probe.job import linear_probe

    if args.inputs:
        raise ValueError("--task linear-probe reads --train and --val, not INPUT arguments")
    if not args.train or not args.val or not args.output or not args.model:
        raise ValueError("--task linear-probe needs --train, --val, --output DIR and --model (or env VTP_MODEL)")
    settings = probe_settings(args)
    # The model runs at the probe's precision (settings.precision): the spec keeps a valid one for its checks.
    spec = pipeline_spec(replace_namespace(args, precision="fp32"))
    if spec.serve is not None:
        raise ValueError("--task linear-probe trains in Ray Train workers of its own: it does not run on a Serve app")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, size=settings.size))
    report = linear_probe(
        args.train,
        args.val,
        args.output,
        spec,
        settings,
        num_classes=args.num_classes,
        max_failures=args.max_failures,
        overwrite=args.overwrite,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, head in report["heads"].items():
        top1 = "n/a" if head["top1"] is None else f"{head['top1']:.2f}"
        print(f"{name}: top-1 {top1}% (n={head['n_last_blocks']}, lr {head['lr']:.4g})")
    print(summary_line(report))
    return 0


def replace_namespace(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})
