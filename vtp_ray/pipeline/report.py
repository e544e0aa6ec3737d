"""Eval reports after the run: the headline line, loading a report back, and comparing two runs (``--compare``)."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..words import plural
from .runner import Placement
from .sources import Inputs
from .spec import ModelFacts, PipelineSpec

__all__ = [
    "FORMAT",
    "PER_IMAGE",
    "PER_IMAGE_METRICS",
    "REPORT",
    "compare_reports",
    "input_counts",
    "load_report",
    "plural",
    "print_comparison",
    "run_header",
    "sort_by_path",
    "summary_line",
]

FORMAT = "vtp-ray-eval"
FORMAT_VERSION = 1
REPORT = "report.json"
PER_IMAGE = "per_image.parquet"
PER_IMAGE_METRICS = ("psnr", "ssim", "lpips")


def run_header(
    inputs: str | Sequence[str], model: ModelFacts, spec: PipelineSpec, placement: Placement
) -> dict[str, Any]:
    """What every eval report starts with: format, version, time, inputs, model, precision, device, preprocessing."""
    prep = spec.preprocessing
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vtp_ray_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(s) for s in ([inputs] if isinstance(inputs, str) else inputs)],
        "model": {k: getattr(model, k) for k in ("name", "spec", "random_weights", "config_digest")},
        "random_weights": model.random_weights,
        "precision": spec.precision,
        "rope_dtype": spec.rope_dtype,
        "device": placement.model_device,
        "device_kind": placement.model_device.split(":")[0],
        "replica_options": placement.options,
        "replica_pool": placement.replicas,
        # "draft_decode": the report field's name from before fast preprocessing had its own word.
        "preprocessing": {"size": prep.size, "crop": prep.crop, "draft_decode": prep.fast},
        **({"serve_app": placement.served.to_dict()} if placement.served else {}),
    }


def input_counts(found: Inputs | None, read: int) -> dict[str, int]:
    """A report's ``inputs`` and ``duplicate_inputs``: the files named (once each), or for a sample source
    (``found`` None) the samples ``read`` (rows + errors)."""
    if found is None:
        return {"inputs": read, "duplicate_inputs": 0}
    return {"inputs": len(found), "duplicate_inputs": found.duplicates}


def sort_by_path(table: pa.Table, order: Callable[[str], Any]) -> pa.Table:
    """The rows of ``table`` sorted by ``order(path)``: the input position of a file, or a sample's (file, key)."""
    paths = table.column("path").to_pylist()
    return table.take(pa.array(sorted(range(len(paths)), key=lambda i: order(paths[i])), pa.int64()))


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
    tasks = {r.get("task", "reconstruction") for r in (report_a, report_b)}
    if tasks == {"zero-shot"}:
        return {**result, **_compare_predictions(dir_a, dir_b)}
    if tasks == {"linear-probe"}:
        return {**result, **_compare_heads(report_a, report_b)}
    if len(tasks) > 1:
        raise ValueError(f"cannot compare reports of different tasks: {' and '.join(sorted(tasks))}")
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


def _compare_predictions(dir_a: Path, dir_b: Path) -> dict[str, Any]:
    """Zero-shot runs joined on path: how many predictions changed, and correct in one run only."""
    columns = ["path", "prediction", "correct_top1"]
    ta, tb = (pq.read_table(d / PER_IMAGE, columns=columns) for d in (dir_a, dir_b))
    joined = ta.join(tb, "path", left_suffix="_a", right_suffix="_b", join_type="inner").to_pandas()
    return {
        "common_images": len(joined),
        "only_a": ta.num_rows - len(joined),
        "only_b": tb.num_rows - len(joined),
        "predictions": {
            "changed": int((joined["prediction_a"] != joined["prediction_b"]).sum()),
            "correct_only_a": int((joined["correct_top1_a"] & ~joined["correct_top1_b"]).sum()),
            "correct_only_b": int((joined["correct_top1_b"] & ~joined["correct_top1_a"]).sum()),
        },
    }


def _compare_heads(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Linear probe runs: every head's top-1, joined on (blocks, base learning rate) since the head names carry the
    scaled rate, which follows the global batch."""

    def heads(report: Mapping[str, Any]) -> dict[str, float | None]:
        return {f"n={h['n_last_blocks']} lr={h['base_lr']:g}": h["top1"] for h in report["heads"].values()}

    ha, hb = heads(a), heads(b)
    joined = {
        key: {"a": ha[key], "b": hb[key], "diff": hb[key] - ha[key] if None not in (ha[key], hb[key]) else None}
        for key in ha
        if key in hb
    }
    modes = {"a": a.get("mode"), "b": b.get("mode")}
    return {"heads": joined, "only_a": len(ha) - len(joined), "only_b": len(hb) - len(joined), "modes": modes}


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
    if "heads" in result:
        if result["modes"]["a"] != result["modes"]["b"]:
            print(f"modes differ: A {result['modes']['a']}, B {result['modes']['b']}", file=file)
        print(f"heads (top-1): {len(result['heads'])} in both, {result['only_a']} only in A, "
              f"{result['only_b']} only in B", file=file)  # fmt: skip
        for name, h in result["heads"].items():
            diff = "n/a" if h["diff"] is None else f"{h['diff']:+.4g}"
            print(f"  {name:<16} {_fmt_g(h['a']):>12} {_fmt_g(h['b']):>12} {diff:>12}", file=file)
        return
    print(
        f"per image: {result['common_images']} in both, {result['only_a']} only in A, {result['only_b']} only in B",
        file=file,
    )
    if result.get("predictions"):
        p = result["predictions"]
        print(
            f"top-1 predictions: {p['changed']} changed, {p['correct_only_a']} correct only in A, "
            f"{p['correct_only_b']} correct only in B",
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


def summary_line(report: Mapping[str, Any]) -> str:
    """One line: counts, headline metrics, throughput."""
    c, m = report["counts"], report["metrics"]
    parts = [f"{name} {_fmt(_headline(m[name]))}" for name in (*PER_IMAGE_METRICS, "rfid", "top1", "top5") if name in m]
    random = " (RANDOM weights: the metrics are meaningless)" if report["random_weights"] else ""
    if report.get("task") == "linear-probe":
        fast = "" if report["mode"] == "protocol" else " (fast mode: NOT upstream's protocol)"
        return (
            f"linear probe {_label(report)}: {plural(c['evaluated'], 'val image')}, {plural(c['errors'], 'error')}; "
            f"top1 {_fmt(m['top1'], 2)} (best head {report['best_head']}, epoch {report['best_epoch']}); "
            f"{c['images_seen']} training images at {report['images_per_s']:.3g} images/s; "
            f"{report['seconds']:.1f}s" + random + fast
        )
    return (
        f"eval {_label(report)}: {plural(c['evaluated'], 'image')}, {plural(c['errors'], 'error')}; "
        + ", ".join(parts) + f"; {report['seconds']:.1f}s ({report['images_per_s']:.3g} images/s)" + random
    )  # fmt: skip
