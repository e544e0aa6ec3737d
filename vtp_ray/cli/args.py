"""The flags commands share, defined once, and their conversion into the library's typed arguments."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from ..cpu_threads import CpuThreads, check_cpu_threads
from ..images import ImageLimits
from ..options import COMPILE_MODES, CROPS, PRECISIONS, ROPE_DTYPES
from ..pipeline import PipelineSpec, Preprocessing, SampleOptions
from ..pipeline.priority import CPU_PRIORITIES
from ..pipeline.served import ServeTarget


def csv(kind: type) -> Callable[[str], list]:
    """``a,b,c`` -> ``[kind(a), kind(b), kind(c)]``."""
    return lambda text: [kind(item) for item in text.split(",") if item]


def add_model_args(
    parser: argparse.ArgumentParser, precision: str = "fp32", required: bool = True, compile: str = "off"
) -> None:
    """The flags every model-running command shares, ``--compile`` (default ``compile``), ``--compile-cache`` and
    ``--cuda-graphs`` among them."""
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
    parser.add_argument("--precision", default=precision, choices=PRECISIONS)
    parser.add_argument("--rope-dtype", default="float32", choices=ROPE_DTYPES)
    parser.add_argument(
        "--compile", default=compile, choices=COMPILE_MODES,
        help=f"run the image verbs through torch.compile: off, on, or auto (where it is known to pay: bf16/fp16 on "
        f"an accelerator or on a CPU with AMX); default {compile}",
    )  # fmt: skip
    parser.add_argument(
        "--compile-cache", default=None, metavar="DIR",
        help="persistent compile cache (default: env VTP_COMPILE_CACHE, else /tmp/vtp-ray-compile-<uid>)",
    )  # fmt: skip
    parser.add_argument(
        "--cuda-graphs", type=on_off, default=True, metavar="on|off",
        help="on CUDA, replay batches of up to the compile batch from recorded CUDA graphs (default: on)",
    )  # fmt: skip


def on_off(text: str) -> bool:
    """``on`` / ``off`` -> True / False."""
    try:
        return {"on": True, "off": False}[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"use on or off, got {text!r}") from None


def replicas_arg(text: str) -> int | tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        return (int(low), int(high)) if sep else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def cpu_threads_arg(text: str) -> CpuThreads:
    value = int(text) if text.isdigit() else text.lower()
    try:
        check_cpu_threads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def resources_arg(text: str) -> str | dict[str, Any]:
    if text.lower() in ("auto", "npu", "gpu", "cuda", "cpu"):
        return text.lower()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected auto, npu, gpu, cpu or a JSON object like '{{\"NPU\": 1}}', got {text!r}"
        )
    return value


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The flags of a Ray Data job over images (``PipelineSpec``), shared by ``tokenize`` and ``eval``."""
    p.add_argument("--size", type=int, default=256, help="square input side in pixels, a multiple of 16")
    p.add_argument("--crop", choices=CROPS, default="center", help="ADM center crop, or plain resize")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    add_replica_args(p)
    p.add_argument("--labels-from-dirs", action="store_true", help="label = first-level sub-directory (ImageFolder)")
    p.add_argument("--max-pixels", type=int, default=ImageLimits.max_pixels, help="larger images become errors")
    p.add_argument("--max-bytes", type=int, default=ImageLimits.max_bytes, help="larger files become errors")
    p.add_argument(
        "--block-size", type=int, metavar="N",
        help="images per preprocess task and replica call (default: ~32 MB of pixels, whole model batches)",
    )  # fmt: skip
    p.add_argument(
        "--fast-preprocess", action="store_true",
        help="load JPEGs at a reduced scale where the center crop allows (faster, not the exact ADM pixels)",
    )  # fmt: skip
    # The flag's name before fast preprocessing had its own word: kept working, left out of --help.
    p.add_argument("--draft-decode", dest="fast_preprocess", action="store_true", help=argparse.SUPPRESS)
    add_sample_args(p)


_REPLICA_FIELDS = (
    *("model", "precision", "device", "rope_dtype", "batch_size"),
    *("replicas", "resources", "address", "cpu_threads", "progress", "dashboard", "preprocess_concurrency"),
    *("compile", "compile_cache", "cuda_graphs", "cpu_priority"),
)


def add_replica_args(p: argparse.ArgumentParser) -> None:
    """Where a job's replica pool runs and how the run shows itself, shared by every Ray Data job."""
    p.add_argument(
        "--replicas", type=replicas_arg, default=None, metavar="N|MIN-MAX",
        help="model actors, or an autoscaling range (default: one per NPU/GPU of the cluster, else 1)",
    )  # fmt: skip
    p.add_argument(
        "--resources", type=resources_arg, default="auto",
        help="per replica: auto (NPU, else GPU, else CPU), npu, gpu, cpu, or Ray resources like '{\"NPU\": 1}'",
    )  # fmt: skip
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: an embedded local Ray, or RAY_ADDRESS)")
    p.add_argument(
        "--cpu-threads", type=cpu_threads_arg, default="auto", metavar="N|auto",
        help="torch threads of a CPU replica: a number, or auto (default): of the node's cores, the fewest within 25%% "
        "of the fastest warm-up call (a small model runs on one thread and leaves the other cores to decoding)",
    )  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument(
        "--dashboard", action="store_true",
        help="start Ray's dashboard with the embedded local Ray (off by default: it adds 1-2 s to the start-up)",
    )  # fmt: skip
    p.add_argument(
        "--preprocess-concurrency", type=int, metavar="N",
        help="read + preprocess tasks at once at most (default: as the CPUs allow; with --serve-app a quarter of "
        "the cluster's CPUs, leaving the app's ingress room)",
    )  # fmt: skip
    g = p.add_argument_group("on a running Serve app (its model replicas, at batch priority: online requests first)")
    g.add_argument(
        "--serve-app", metavar="NAME",
        help="run the model work on this Serve application of the cluster (--address) instead of replicas of the "
        "job's own; the app must serve --model at --precision and --rope-dtype",
    )  # fmt: skip
    g.add_argument("--serve-model", metavar="NAME", help="which of the app's models (default: its default model)")
    p.add_argument(
        "--cpu-priority", choices=CPU_PRIORITIES,
        help="the OS priority of the job's own work: low (niceness 19; Ray runs its workers at 15), idle (Linux "
        "SCHED_IDLE: only the CPU other work leaves) or normal; default: low with --serve-app, so that the app's "
        "processes get the cores first; else normal",
    )  # fmt: skip
    g.add_argument(
        "--serve-calls", type=int, metavar="N",
        help="blocks in flight at once (default: one per running model replica of the app)",
    )  # fmt: skip


def replica_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PipelineSpec`` fields of the model flags, ``--batch-size`` and ``add_replica_args``'s flags."""
    fields = {name: getattr(args, name) for name in _REPLICA_FIELDS}
    if args.serve_app:
        fields["serve"] = ServeTarget(args.serve_app, args.serve_model, args.serve_calls)
    elif args.serve_model or args.serve_calls:
        raise ValueError("--serve-model and --serve-calls go with --serve-app")
    return fields


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """How samples in webdataset tar shards and parquet files with image bytes are read (``SampleOptions``)."""
    g = p.add_argument_group("webdataset shards and parquet files with image bytes")
    g.add_argument(
        "--image-key", type=csv(str), default=list(SampleOptions.image_keys), metavar="K1,K2",
        help="tar: image member extensions, first present wins (default jpg,jpeg,png,webp); parquet: image column",
    )  # fmt: skip
    g.add_argument("--key-column", default=SampleOptions.key, help="parquet: the sample key column (default key)")
    g.add_argument("--label-key", help="tar: label member (default cls) or json:FIELD; parquet: column (default label)")
    g.add_argument("--caption-key", help="keep a caption column: tar member (txt) or parquet column (caption)")


def preprocessing(args: argparse.Namespace) -> Preprocessing:
    """The ``Preprocessing`` of ``--size``, ``--crop``, ``--max-bytes``, ``--max-pixels`` and ``--fast-preprocess``."""
    limits = ImageLimits(max_bytes=args.max_bytes, max_pixels=args.max_pixels)
    return Preprocessing(size=args.size, crop=args.crop, limits=limits, fast=args.fast_preprocess)


def pipeline_spec(args: argparse.Namespace) -> PipelineSpec:
    """The ``PipelineSpec`` of the model flags and the pipeline flags."""
    return PipelineSpec(
        **replica_fields(args),
        preprocessing=preprocessing(args),
        labels_from_dirs=args.labels_from_dirs,
        samples=SampleOptions(
            image_keys=tuple(args.image_key), key=args.key_column, label=args.label_key, caption=args.caption_key
        ),
        block_size=args.block_size,
    )
