"""``vtp-ray tokenize | eval``: the Ray Data jobs over image sets."""

from __future__ import annotations

import argparse
import json

from ..metrics import INCEPTION_ENV, LPIPS_ENV
from ..pipeline.store import LATENT_DTYPES
from ..text import TEMPLATE_SETS
from .args import add_model_args, add_pipeline_args, add_replica_args, pipeline_spec, replica_fields
from .probe import add_probe_args, eval_defaults, run_probe, task_defaults


def register(sub: argparse._SubParsersAction) -> None:
    """Add the job commands to the ``vtp-ray`` command's subparsers."""
    p = sub.add_parser(
        "tokenize",
        help="tokenize an image dataset into parquet latents with Ray Data",
        description="Tokenize images into parquet latents (DIR/data), errors.parquet, stats.json and manifest.json. "
        "Re-running the same command on the same DIR resumes.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="directory (recursive), glob, manifest (.txt, or .csv/.tsv/.parquet with a path column and an "
        "optional label column) or image file; or webdataset .tar shards / parquet files with image bytes (files, "
        "directories, globs); local or any pyarrow URI (s3://...)",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (local or URI)")
    add_model_args(p, compile="auto")
    add_pipeline_args(p)
    p.add_argument("--flip", action="store_true", help="also store latents_flip (horizontally flipped image)")
    p.add_argument("--dtype", dest="latent_dtype", choices=list(LATENT_DTYPES), default="float32",
                   help="dtype of the stored latents")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="delete existing results in DIR instead of resuming")
    p.add_argument("--retry-errors", action="store_true", help="also redo inputs recorded in errors.parquet")
    p.add_argument(
        "--rows-per-file", type=int, default=None,
        help="inputs per part file (default 2048; lightningdit: images per shard, default 10000)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("parquet", "lightningdit"), default="parquet",
        help="parquet (DIR/data), or LightningDiT's safetensors shards + latents_stats.pt (implies --flip; needs "
        "labels: --labels-from-dirs, or for shards / parquet image bytes each sample's integer class id, cls "
        "member or label column)",
    )  # fmt: skip
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser(
        "export",
        help="convert a tokenize parquet output into LightningDiT shards (no recomputation)",
        description="Write the latents, latents_flip and labels of a `vtp-ray tokenize --flip --labels-from-dirs` "
        "output as LightningDiT's latents_rank00_shardNNN.safetensors, latents_stats.pt and classes.txt. "
        "Re-running resumes.",
    )
    p.add_argument("source", metavar="PARQUET_DIR", help="a vtp-ray tokenize output directory")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the shard directory (data.data_path)")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="images per shard (upstream: about 10000)")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards in DIR instead of resuming")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "decode",
        help="decode latents (LightningDiT shards, .npy/.npz, a tokenize output) into PNGs or one .npz",
        description="Decode every latent through the replica pool: DIR/000000.png... in input order, or with --npz "
        "one DIR/samples.npz (arr_0: uint8 (N, H, W, 3), what ADM's FID evaluator reads).",
    )
    p.add_argument(
        "latents", nargs="+", metavar="LATENTS",
        help="shard directory or .safetensors, .npy / .npz of (N, C, h, w), or a tokenize output",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--key", help="array to decode: latents (default), latents_flip, or an .npz key (default arr_0)")
    p.add_argument("--stats", metavar="FILE", help="de-normalize first, x * std + mean: latents_stats.pt or stats.json")
    p.add_argument("--npz", action="store_true", help="write one samples.npz instead of PNGs")
    add_model_args(p, compile="auto")
    p.add_argument("--batch-size", type=int, default=32, help="latents per model call")
    add_replica_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser(
        "eval",
        help="reconstruction quality (PSNR, SSIM, LPIPS, rFID) over an image set with Ray Data",
        description="Reconstruct every input through a replica pool and write DIR/report.json and "
        "DIR/per_image.parquet; or, with --compare A B, print the differences of two such runs.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="directories, globs, manifests or images, or webdataset shards / parquet image bytes (as tokenize)",
    )  # fmt: skip
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two eval runs (DIR or DIR/report.json)")
    add_model_args(p, required=False, compile="auto")  # --compare needs no model: cmd_eval checks it for a run
    add_pipeline_args(p)
    p.add_argument(
        "--save-images", type=int, default=0, metavar="N",
        help="save the first N (shards / parquet: the first samples of the first files) as reference|recon PNGs",
    )  # fmt: skip
    p.add_argument(
        "--inception-weights", metavar="PATH",
        help=f"pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth (env {INCEPTION_ENV})",
    )  # fmt: skip
    p.add_argument(
        "--lpips-weights", metavar="PATH",
        help=f"LPIPS state dict: VGG16 (upstream's) or AlexNet trunk + lin0..4 heads (env {LPIPS_ENV})",
    )  # fmt: skip
    p.add_argument(
        "--task", choices=("reconstruction", "zero-shot", "linear-probe"), default="reconstruction",
        help="reconstruction quality, or CLIP zero-shot accuracy over an ImageFolder tree (class = sorted directory) "
        "or shards / parquet image bytes (class = the sample's integer label: cls member or label column), or "
        "linear probing on Ray Train (--train / --val, see below)",
    )  # fmt: skip
    p.add_argument(
        "--classnames", metavar="FILE",
        help="zero-shot: one class name per line (sorted directory order; shards / parquet: class index order), or "
        "a JSON {directory: name}; default: the 1000 OpenAI ImageNet names",
    )  # fmt: skip
    p.add_argument("--template-set", choices=TEMPLATE_SETS, default="imagenet",
                   help="zero-shot prompt templates: imagenet (OpenAI's 80, as upstream) or default (one)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report (or the comparison) as JSON")
    add_probe_args(p)
    p.set_defaults(func=cmd_eval, **eval_defaults())  # the probe's differ: probe.task_defaults


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Prints the summary line; exit code 1 if some inputs are still missing."""
    from ..pipeline.jobs.tokenize import tokenize_dataset

    shards = args.format == "lightningdit"
    summary = tokenize_dataset(
        args.inputs,
        args.output,
        pipeline_spec(args),
        flip=args.flip or shards,
        latent_dtype=args.latent_dtype,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        rows_per_file=args.rows_per_file or (10_000 if shards else 2048),
        format=args.format,
    )
    print(summary.line())
    return 1 if summary.missing else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Prints the summary line."""
    from ..pipeline.jobs.lightningdit import export_lightningdit

    summary = export_lightningdit(args.source, args.output, rows_per_file=args.rows_per_file, overwrite=args.overwrite)
    print(summary.line())
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """Prints the summary line; exit code 1 if some latents could not be decoded."""
    from ..pipeline import PipelineSpec
    from ..pipeline.jobs.decode import decode_latents

    spec = PipelineSpec(**replica_fields(args))
    summary = decode_latents(args.latents, args.output, spec, key=args.key, stats=args.stats, npz=args.npz)
    print(summary.line())
    return 1 if summary.errors else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Prints the headline metrics (or the comparison)."""
    from ..pipeline.report import REPORT, compare_reports, print_comparison, summary_line

    if args.compare:
        if args.inputs or args.output:
            raise ValueError("--compare takes two reports and no INPUT / --output")
        result = compare_reports(*args.compare)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_comparison(result)
        return 0
    task_defaults(args)
    if args.task == "linear-probe":
        return run_probe(args)
    if not args.inputs or not args.output or not args.model:
        raise ValueError("eval needs INPUT..., --output DIR and --model (or env VTP_MODEL), or --compare A B")
    if args.task == "zero-shot":
        return _zero_shot(args)
    from ..pipeline.jobs.evaluate import evaluate_dataset

    report = evaluate_dataset(
        args.inputs,
        args.output,
        pipeline_spec(args),
        save_images=args.save_images,
        inception_weights=args.inception_weights,
        lpips_weights=args.lpips_weights,
    )
    if args.json:
        print(json.dumps(report, indent=2, default=list))
        return 0
    print(summary_line(report))
    if report["skipped_metrics"]:  # the reasons were logged when the run started, and are in the report
        print(f"skipped: {', '.join(report['skipped_metrics'])} (see skipped_metrics in {REPORT})")
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    """``eval --task zero-shot``: prints the accuracy line (or the report as JSON)."""
    from ..pipeline.jobs.zeroshot import zero_shot_dataset
    from ..pipeline.report import summary_line

    report = zero_shot_dataset(
        args.inputs, args.output, pipeline_spec(args), classnames=args.classnames, template_set=args.template_set
    )
    print(json.dumps(report, indent=2) if args.json else summary_line(report))
    return 0
