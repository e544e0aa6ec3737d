"""Reconstruction quality of a model over an image set with Ray Data (``vtp-ray eval``), and run comparison.

Pipeline::

    inputs (driver)  ->  read + decode + crop  ->  EvalWorker actor pool                 ->  driver
    path, label          CPU tasks (tokenize's    reconstruct, then on the same device:      per-image table,
                         decode stage)            PSNR, SSIM, [LPIPS], [Inception features]  feature statistics, PNGs

The metrics are computed inside the model actor, where the reference and the reconstruction already are: only
numbers (and 2 x 2048 Inception features per image for rFID) travel back, never the images, except the first
``save_images`` ones. Undecodable inputs become error rows with their reason; they never stop the job.

Output directory: ``report.json`` (model, precision, device kind, counts, errors, aggregated metrics),
``per_image.parquet`` (path, label, width, height, psnr, ssim[, lpips]) and ``images/`` (reference |
reconstruction PNGs). ``compare_reports`` / ``vtp-ray eval --compare A B`` print the differences of two runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import __version__
from .dataset import discover_inputs
from .images import CropMode, DecodeLimits, to_png_bytes
from .quality import (
    INCEPTION_DIM,
    INCEPTION_ENV,
    LPIPS_ENV,
    FeatureStats,
    resolve_weights,
)
from .tokenize import model_facts, pipeline_kwargs

if TYPE_CHECKING:
    pass

__all__ = [
    "FORMAT",
    "EvalWorker",
    "add_cli",
    "compare_reports",
    "evaluate_dataset",
    "load_report",
    "print_comparison",
    "summary_line",
]

log = logging.getLogger(__name__)

FORMAT = "vtp-ray-eval"
FORMAT_VERSION = 1
REPORT = "report.json"
PER_IMAGE = "per_image.parquet"
IMAGES = "images"
PER_IMAGE_METRICS = ("psnr", "ssim", "lpips")


def _fixed_list(values: np.ndarray | None, valid: np.ndarray, dim: int) -> pa.Array:
    """``(n_valid, dim)`` float32 -> a ``len(valid)`` fixed_size_list<float32> array, null where not valid."""
    full = np.zeros((len(valid), dim), np.float32)
    if values is not None:
        full[valid] = values
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=pa.array(~valid))


def _scatter(values: np.ndarray | None, valid: np.ndarray) -> pa.Array:
    """Per-valid-row float64 values -> a full-length column, null for error rows (or all null if ``None``)."""
    full = np.zeros(len(valid), np.float64)
    if values is not None:
        full[valid] = values
    return pa.array(full, pa.float64(), mask=~valid if values is not None else np.ones(len(valid), bool))


class EvalWorker:
    """A Ray Data actor: decoded rows in, the reconstruction's metrics (and Inception features) out.

    Holds one ``VTPReplica`` and, when their weights are given, an Inception v3 and an LPIPS network on the same
    device. Error rows pass through with null metrics.
    """

    def __init__(
        self,
        *,
        model: str,
        device: str,
        precision: str,
        rope_dtype: str,
        cpu_threads: int | None,
        size: int,
        expected_digest: str,
        inception_weights: str | None,
        lpips_weights: str | None,
        save_paths: frozenset[str],
    ) -> None:
        from .quality import InceptionFeatures, Lpips
        from .replica import VTPReplica
        from .tokenize import replica_cpu_threads, replica_label

        self.replica = VTPReplica(
            model, device, precision, rope_dtype, warmup_size=size, cpu_threads=replica_cpu_threads(cpu_threads, device)
        )
        info = self.replica.info
        if info["config_digest"] != expected_digest:
            raise RuntimeError(f"model {model!r} has config digest {info['config_digest']} here, not {expected_digest}")
        self.size, self.save_paths = size, save_paths
        self.inception = InceptionFeatures(inception_weights, self.replica.device) if inception_weights else None
        self.lpips = Lpips(lpips_weights, self.replica.device) if lpips_weights else None
        self.name = replica_label(info["device"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from .quality import psnr, ssim

        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        n_valid = int(valid.sum())
        started = time.perf_counter()
        metrics: dict[str, np.ndarray] = {}
        features: dict[str, np.ndarray] = {}
        saved = np.zeros(len(valid), bool)
        reconstructions: list[bytes | None] = [None] * len(valid)
        if n_valid:
            images = batch.column("image").filter(pa.array(valid)).combine_chunks()
            width = self.size * self.size * 3
            pixels = np.frombuffer(images.buffers()[1], np.uint8, n_valid * width, images.offset * width)
            pixels = pixels.reshape(n_valid, self.size, self.size, 3).copy()
            recon = self.replica.reconstruct(pixels)
            reference, output = (torch.from_numpy(a).to(self.replica.device) for a in (pixels, recon))
            metrics["psnr"] = psnr(pixels, recon)
            metrics["ssim"] = ssim(reference, output)
            if self.lpips is not None:
                metrics["lpips"] = self.lpips(reference, output)
            if self.inception is not None:
                features["reference_features"] = self.inception(reference)
                features["reconstruction_features"] = self.inception(output)
            rows = np.flatnonzero(valid)
            paths = batch.column("path").to_pylist()
            for k, row in enumerate(rows):
                if paths[row] in self.save_paths:
                    saved[row] = True
                    reconstructions[row] = recon[k].tobytes()
        seconds = time.perf_counter() - started
        # Images travel back to the driver only for the rows it saves as PNGs.
        kind = batch.column("image").type
        out = batch.drop_columns(["image"])
        out = out.append_column("image", pc.if_else(pa.array(saved), batch.column("image"), pa.nulls(len(valid), kind)))
        out = out.append_column("reconstruction", pa.array(reconstructions, kind))
        for name in PER_IMAGE_METRICS:
            out = out.append_column(name, _scatter(metrics.get(name), valid))
        if self.inception is not None:
            for name in ("reference_features", "reconstruction_features"):
                out = out.append_column(name, _fixed_list(features.get(name), valid, INCEPTION_DIM))
        out = out.append_column("replica", pa.array([self.name] * len(valid), pa.string()))
        return out.append_column("model_seconds", pa.array(np.where(valid, seconds / max(n_valid, 1), 0.0)))


# ------------------------------------------------------------------------------------------ the driver


class _Collector:
    """Gathers the pipeline's output on the driver: per-image rows, errors, feature statistics, PNGs."""

    def __init__(self, images_dir: Path, size: int, order: Mapping[str, int]) -> None:
        self.images_dir, self.size, self.order = images_dir, size, order
        self.rows: list[pa.Table] = []
        self.errors: list[dict[str, Any]] = []
        self.reference = FeatureStats(INCEPTION_DIM)
        self.reconstruction = FeatureStats(INCEPTION_DIM)
        self.replicas: Counter[str] = Counter()
        self.busy: Counter[str] = Counter()
        self.processed = self.saved = 0

    def add(self, batch: pa.Table) -> None:
        self.processed += batch.num_rows
        failed = batch.column("error").is_valid()
        self.errors.extend(batch.filter(failed).select(["path", "reason", "error"]).to_pylist())
        ok = batch.filter(pc.invert(failed))
        if not ok.num_rows:
            return
        self.replicas.update(ok.column("replica").to_pylist())
        for row in batch.group_by("replica").aggregate([("model_seconds", "sum")]).to_pylist():
            self.busy[row["replica"]] += row["model_seconds_sum"]
        if "reference_features" in ok.column_names:
            for name, stats in (
                ("reference_features", self.reference),
                ("reconstruction_features", self.reconstruction),
            ):
                column = ok.column(name).combine_chunks()
                stats.add(column.values.to_numpy(zero_copy_only=False).reshape(-1, INCEPTION_DIM))
        self.rows.append(ok.select(["path", "label", "width", "height", *PER_IMAGE_METRICS]))
        for row in ok.filter(ok.column("reconstruction").is_valid()).to_pylist():
            self._save(row)

    def _save(self, row: Mapping[str, Any]) -> None:
        shape = (self.size, self.size, 3)
        pair = np.concatenate([np.frombuffer(row[k], np.uint8).reshape(shape) for k in ("image", "reconstruction")], 1)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(row["path"]).stem[:80]
        (self.images_dir / f"{self.order[row['path']]:06d}_{stem}.png").write_bytes(to_png_bytes(pair))
        self.saved += 1

    def per_image(self) -> pa.Table:
        schema = pa.schema(
            [("path", pa.string()), ("label", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
            + [(name, pa.float64()) for name in PER_IMAGE_METRICS]
        )
        table = pa.concat_tables(self.rows) if self.rows else schema.empty_table()
        index = pa.array([self.order[p] for p in table.column("path").to_pylist()], pa.int64())
        return table.take(pc.sort_indices(index))


def _summary(values: np.ndarray) -> dict[str, Any]:
    """Mean / min / max of finite values; PSNR's ``inf`` (identical images) is counted apart."""
    finite = values[np.isfinite(values)]
    summary: dict[str, Any] = {"count": len(values)}
    if len(finite):
        summary.update(mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()))
        summary["max"] = float(finite.max())
    if len(finite) < len(values):
        summary["infinite"] = int(len(values) - len(finite))
    return summary


def _check(size: int, batch_size: int, precision: str, replicas: Any, save_images: int) -> None:
    from .tokenize import check_arguments

    check_arguments(size, batch_size, 1, "float32", precision, replicas)
    if save_images < 0:
        raise ValueError(f"save_images must be >= 0, got {save_images}")


def evaluate_dataset(
    inputs: str | Sequence[str],
    output: str | os.PathLike[str],
    *,
    model: str,
    precision: str = "fp32",
    device: str = "auto",
    size: int = 256,
    crop: CropMode = "center",
    batch_size: int = 32,
    replicas: int | tuple[int, int] | None = None,
    resources: str | Mapping[str, Any] = "auto",
    decode_cpus: float = 0.5,
    labels_from_dirs: bool = False,
    address: str | None = None,
    save_images: int = 0,
    inception_weights: str | os.PathLike[str] | None = None,
    lpips_weights: str | os.PathLike[str] | None = None,
    limits: DecodeLimits | None = None,
    rope_dtype: str = "float32",
    cpu_threads: int | None = None,
    filesystem: pafs.FileSystem | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruct every image named by ``inputs`` and measure the reconstruction quality.

    Inputs, placement, ``replicas`` / ``resources`` / ``decode_cpus`` / ``address`` are as in
    ``tokenize.tokenize_dataset``. ``output`` is a local directory (created; its report is replaced).
    ``inception_weights`` / ``lpips_weights`` (default: env ``VTP_INCEPTION_WEIGHTS`` / ``VTP_LPIPS_WEIGHTS``)
    enable rFID and LPIPS; without them those metrics are skipped and the report says what is missing. The weight
    files must be readable at the same path on every node. ``save_images``: write the first N inputs as
    reference | reconstruction PNGs in ``output/images``.

    Returns the report (also written to ``output/report.json``).
    """
    from .tokenize import Pipeline, pipeline_outputs, progress_bars, ray_session

    started = time.perf_counter()
    _check(size, batch_size, precision, replicas, save_images)
    limits = limits or DecodeLimits()
    inception = resolve_weights(inception_weights, INCEPTION_ENV, "Inception v3", "--inception-weights")
    lpips = resolve_weights(lpips_weights, LPIPS_ENV, "LPIPS", "--lpips-weights")
    skipped: dict[str, str] = {}
    if inception is None:
        skipped["rfid"] = f"no Inception v3 weights: pass --inception-weights PATH or set {INCEPTION_ENV}"
    if lpips is None:
        skipped["lpips"] = f"no LPIPS weights: pass --lpips-weights PATH or set {LPIPS_ENV}"
    for metric, reason in skipped.items():
        log.warning("%s skipped: %s", metric, reason)
    found = discover_inputs(inputs, labels_from_dirs=labels_from_dirs, filesystem=filesystem)
    facts = model_facts(model, size)
    out = Path(output).expanduser()
    paths = found.table.column("path").to_pylist()
    collector = _Collector(out / IMAGES, size, {p: i for i, p in enumerate(paths)})
    pipeline = Pipeline(
        model=facts["spec"], config_digest=facts["config_digest"], precision=precision, rope_dtype=rope_dtype,
        device=device, size=size, crop=crop, batch_size=batch_size, replicas=replicas, resources=resources,
        decode_cpus=decode_cpus, flip=False, latent_dtype="float32", cpu_threads=cpu_threads, limits=limits,
        filesystem=filesystem,
    )  # fmt: skip
    with ray_session(address), progress_bars(progress):
        options, run_device, pool = pipeline.placement()
        worker = {
            "inception_weights": str(inception) if inception else None,
            "lpips_weights": str(lpips) if lpips else None,
            "save_paths": frozenset(paths[:save_images]),
        }
        dataset = pipeline.dataset(found.table, options, run_device, pool, EvalWorker, worker)
        for batch in pipeline_outputs(dataset):
            collector.add(batch)
    seconds = time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves nothing behind
    per_image = collector.per_image()
    if lpips is None:
        per_image = per_image.drop_columns(["lpips"])
    pq.write_table(per_image, out / PER_IMAGE)
    metrics: dict[str, Any] = {}
    for name in PER_IMAGE_METRICS:
        if name in per_image.column_names:
            metrics[name] = _summary(per_image.column(name).to_numpy(zero_copy_only=False).astype(np.float64))
    if inception is not None:
        if collector.reference.count >= 2:
            metrics["rfid"] = collector.reference.frechet_to(collector.reconstruction)
        else:
            skipped["rfid"] = f"rFID needs at least 2 images, {collector.reference.count} were evaluated"
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vtp_ray_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(s) for s in ([inputs] if isinstance(inputs, str) else inputs)],
        "model": {k: facts[k] for k in ("name", "spec", "random_weights", "config_digest")},
        "random_weights": facts["random_weights"],
        "precision": precision,
        "rope_dtype": rope_dtype,
        "device": run_device,
        "device_kind": run_device.split(":")[0],
        "replica_options": options,
        "replica_pool": pool,
        "preprocessing": {"size": size, "crop": crop},
        "metric_weights": {"inception": str(inception) if inception else None, "lpips": str(lpips) if lpips else None},
        "counts": {
            "inputs": len(found),
            "duplicate_inputs": found.duplicates,
            "evaluated": per_image.num_rows,
            "errors": len(collector.errors),
            "errors_by_reason": dict(Counter(e["reason"] for e in collector.errors)),
            "saved_images": collector.saved,
        },
        "metrics": metrics,
        "skipped_metrics": skipped,
        "errors": sorted(collector.errors, key=lambda e: collector.order[e["path"]]),
        "replicas": dict(collector.replicas),
        "replica_model_s": {k: round(v, 3) for k, v in collector.busy.items()},
        "seconds": round(seconds, 3),
        "images_per_s": round(collector.processed / seconds, 3),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, frozenset, set)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------ comparison


def load_report(location: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """``(report, directory)`` from an eval output directory or its ``report.json``."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{location}: no {REPORT} (pass an eval output directory or its report.json)")
    report = json.loads(path.read_text())
    if report.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vtp-ray eval report (format {report.get('format')!r})")
    return report, path.parent


def _label(report: Mapping[str, Any]) -> str:
    return f"{report['model']['name']} {report['device_kind']} {report['precision']}"


def compare_reports(a: str | os.PathLike[str], b: str | os.PathLike[str], *, top: int = 5) -> dict[str, Any]:
    """Differences ``B - A`` of two eval runs: aggregated metrics, and per-image PSNR joined on path."""
    report_a, dir_a = load_report(a)
    report_b, dir_b = load_report(b)
    metrics: dict[str, dict[str, float | None]] = {}
    for name in sorted(set(report_a["metrics"]) | set(report_b["metrics"])):
        va, vb = (_headline(r["metrics"].get(name)) for r in (report_a, report_b))
        metrics[name] = {"a": va, "b": vb, "diff": vb - va if va is not None and vb is not None else None}
    result: dict[str, Any] = {"a": _label(report_a), "b": _label(report_b), "metrics": metrics}
    columns = ["path", "psnr", "ssim"]
    ta, tb = (pq.read_table(d / PER_IMAGE, columns=columns) for d in (dir_a, dir_b))
    joined = ta.join(tb, "path", left_suffix="_a", right_suffix="_b", join_type="inner").to_pandas()
    result["common_images"] = len(joined)
    result["only_a"], result["only_b"] = ta.num_rows - len(joined), tb.num_rows - len(joined)
    if len(joined):
        diff = (joined["psnr_b"] - joined["psnr_a"]).replace([np.inf, -np.inf], np.nan)
        ssim_diff = joined["ssim_b"] - joined["ssim_a"]
        result["psnr_diff"] = {
            "mean": _finite(diff.mean()),
            "mean_abs": _finite(diff.abs().mean()),
            "max_abs": _finite(diff.abs().max()),
        }
        result["ssim_diff"] = {"mean": _finite(ssim_diff.mean()), "max_abs": _finite(ssim_diff.abs().max())}
        worst = joined.assign(diff=diff).dropna(subset=["diff"])
        worst = worst.reindex(worst["diff"].abs().sort_values(ascending=False).index).head(top)
        result["largest_psnr_diffs"] = [
            {"path": r.path, "psnr_a": r.psnr_a, "psnr_b": r.psnr_b, "diff": r.diff} for r in worst.itertuples()
        ]
    return result


def _headline(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("mean")
    return float(value) if value is not None else None


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def print_comparison(result: Mapping[str, Any], file: TextIO | None = None) -> None:
    """The comparison as a small text table (on stdout by default)."""
    file = file or sys.stdout
    print(f"A: {result['a']}\nB: {result['b']}", file=file)
    print(f"{'metric':<8} {'A':>12} {'B':>12} {'B - A':>12}", file=file)
    for name, m in result["metrics"].items():
        diff = "n/a" if m["diff"] is None else f"{m['diff']:+.6g}"
        print(f"{name:<8} {_fmt_g(m['a']):>12} {_fmt_g(m['b']):>12} {diff:>12}", file=file)
    print(
        f"per image: {result['common_images']} in both, {result['only_a']} only in A, {result['only_b']} only in B",
        file=file,
    )
    if result.get("psnr_diff"):
        d, s = result["psnr_diff"], result["ssim_diff"]
        print(
            f"PSNR B - A (dB): mean {_fmt(d['mean'])}, mean |diff| {_fmt(d['mean_abs'])}, max |diff| "
            f"{_fmt(d['max_abs'])}; SSIM B - A: mean {_fmt(s['mean'], 6)}, max |diff| {_fmt(s['max_abs'], 6)}",
            file=file,
        )
        for r in result["largest_psnr_diffs"]:
            print(f"  {r['diff']:+.4f} dB  {r['psnr_a']:.3f} -> {r['psnr_b']:.3f}  {r['path']}", file=file)


# ----------------------------------------------------------------------------------------------- the CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vtp-ray eval`` on the ``vtp-ray`` command's subparsers."""
    from .cli import add_model_args
    from .tokenize import add_pipeline_args

    p = subparsers.add_parser(
        "eval",
        help="reconstruction quality (PSNR, SSIM, LPIPS, rFID) over an image set with Ray Data",
        description="Reconstruct every input through a replica pool and write DIR/report.json and "
        "DIR/per_image.parquet; or, with --compare A B, print the differences of two such runs.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="directories, globs, manifests or images (as tokenize)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two eval runs (DIR or DIR/report.json)")
    add_model_args(p, required=False)  # --compare needs no model: run_cli checks it for a run
    add_pipeline_args(p)
    p.add_argument("--save-images", type=int, default=0, metavar="N", help="save the first N as reference|recon PNGs")
    p.add_argument(
        "--inception-weights", metavar="PATH", help=f"torchvision inception_v3 state dict (env {INCEPTION_ENV})"
    )
    p.add_argument("--lpips-weights", metavar="PATH", help=f"LPIPS AlexNet state dict (env {LPIPS_ENV})")
    p.add_argument("--json", action="store_true", help="print the report (or the comparison) as JSON")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``vtp-ray eval``: prints the headline metrics (or the comparison)."""
    if args.compare:
        if args.inputs or args.output:
            raise ValueError("--compare takes two reports and no INPUT / --output")
        result = compare_reports(*args.compare)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_comparison(result)
        return 0
    if not args.inputs or not args.output or not args.model:
        raise ValueError("eval needs INPUT..., --output DIR and --model (or env VTP_MODEL), or --compare A B")
    report = evaluate_dataset(
        args.inputs,
        args.output,
        save_images=args.save_images,
        inception_weights=args.inception_weights,
        lpips_weights=args.lpips_weights,
        **pipeline_kwargs(args),
    )
    if args.json:
        print(json.dumps(report, indent=2, default=_json_default))
        return 0
    print(summary_line(report))
    if report["skipped_metrics"]:  # the reasons were logged when the run started, and are in the report
        print(f"skipped: {', '.join(report['skipped_metrics'])} (see skipped_metrics in {REPORT})")
    return 0


def summary_line(report: Mapping[str, Any]) -> str:
    """One line: counts, headline metrics, throughput."""
    c, m = report["counts"], report["metrics"]
    parts = [f"{name} {_fmt(_headline(m[name]))}" for name in (*PER_IMAGE_METRICS, "rfid") if name in m]
    return (
        f"eval {_label(report)}: {c['evaluated']} images, {c['errors']} errors; " + ", ".join(parts)
        + f"; {report['seconds']:.1f}s ({report['images_per_s']:.1f} images/s)"
    )  # fmt: skip
