"""``vtp-ray eval``: reconstruction quality of a model over an image set.

The job is the shared pipeline (``runner``) with ``EvalWorker`` as its model stage: it reconstructs each batch
and computes the metrics right there, on the device that holds the reference and the reconstruction, so only
numbers (and 2 x 2048 Inception features per image for rFID) travel back, never the images, except the first
``save_images`` ones. Inputs that cannot be loaded become error rows with their reason; they never stop the job.

Inputs are files (``sources.files``: outputs in input order) or sample sources (``sources.samples``: webdataset
shards, parquet with image bytes; streamed, never listed: outputs ordered by file, then key, and the images saved
are the first samples of the first files, ``SampleSource.first_samples``).

Output directory: ``report.json`` (model, precision, device kind, counts, errors, aggregated metrics),
``per_image.parquet`` (path, label, width, height, psnr, ssim[, lpips]) and ``images/`` (reference |
reconstruction PNGs). ``report.compare_reports`` prints the differences of two runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...images import to_png_bytes
from ...metrics import (
    INCEPTION_DIM,
    INCEPTION_ENV,
    LPIPS_ENV,
    FeatureStats,
    require_eval_dependencies,
    resolve_weights,
)
from ..report import PER_IMAGE, PER_IMAGE_METRICS, REPORT, input_counts, run_header, sort_by_path
from ..runner import ReplicaUsage, run_pipeline
from ..sources import SampleSource, find_source, sample_sort_key, source_of
from ..spec import ModelFacts, PipelineSpec
from ..stages import fixed_size_lists, nullable_floats
from ..worker import ModelStage

__all__ = ["EvalWorker", "evaluate_dataset"]

log = logging.getLogger(__name__)

IMAGES = "images"
_FEATURES = ("reference_features", "reconstruction_features")


class EvalWorker(ModelStage):
    """The model stage: reconstruct, then PSNR, SSIM, [LPIPS], [Inception features] on the same device.

    The metric networks are built when their weights are given. Reconstructions travel back only for the rows
    whose path is in ``save_paths``.
    """

    # Actors on a Serve app too: a task's process would keep the metric networks (LPIPS's VGG, Inception) after the
    # job, and each new process of the pool would build them again.
    served_in_tasks = False

    def __init__(
        self, *, inception_weights: str | None, lpips_weights: str | None, save_paths: frozenset[str], **base: Any
    ) -> None:
        from ...metrics import FidInceptionFeatures, Lpips

        super().__init__(**base)
        device = self.replica.device
        self.inception = FidInceptionFeatures(inception_weights, device) if inception_weights else None
        self.lpips = Lpips(lpips_weights, device) if lpips_weights else None
        self.save_paths = save_paths

    def process(self, images: np.ndarray, rows: pa.Table) -> dict[str, Any]:
        import torch

        from ...metrics import psnr, ssim

        recon = self.replica.reconstruct(images)
        reference, output = (torch.from_numpy(a).to(self.replica.device) for a in (images, recon))
        result: dict[str, Any] = {"psnr": psnr(images, recon), "ssim": ssim(reference, output)}
        if self.lpips is not None:
            result["lpips"] = self.lpips(reference, output)
        if self.inception is not None:
            result["reference_features"] = self.inception(reference)
            result["reconstruction_features"] = self.inception(output)
        keep = [path in self.save_paths for path in rows.column("path").to_pylist()]
        result["reconstructions"] = [r.tobytes() if k else None for r, k in zip(recon, keep, strict=True)]
        return result

    def columns(self, batch: pa.Table, valid: np.ndarray, result: dict[str, Any] | None) -> pa.Table:
        result = result or {}
        kind = batch.column("image").type
        reconstructions: list[bytes | None] = [None] * len(valid)
        for row, data in zip(np.flatnonzero(valid), result.get("reconstructions", []), strict=True):
            reconstructions[row] = data
        saved = pa.array([r is not None for r in reconstructions])
        out = batch.drop_columns(["image"])
        out = out.append_column("image", pc.if_else(saved, batch.column("image"), pa.nulls(len(valid), kind)))
        out = out.append_column("reconstruction", pa.array(reconstructions, kind))
        for name in PER_IMAGE_METRICS:
            out = out.append_column(name, nullable_floats(result.get(name), valid))
        if self.inception is not None:
            for name in _FEATURES:
                out = out.append_column(name, fixed_size_lists(result.get(name), valid, pa.float32(), (INCEPTION_DIM,)))
        return out


class _Collector:
    """Gathers the pipeline's output on the driver: per-image rows, errors, feature statistics, PNGs.

    ``order`` is the sort key of a path in the outputs; ``saved`` numbers the paths whose PNGs are written.
    """

    def __init__(self, images_dir: Path, size: int, order: Callable[[str], Any], saved: Sequence[str]) -> None:
        self.images_dir, self.size, self.order = images_dir, size, order
        self.save_index = {p: i for i, p in enumerate(saved)}
        self.usage = ReplicaUsage()
        self.rows: list[pa.Table] = []
        self.errors: list[dict[str, Any]] = []
        self.features = {name: FeatureStats(INCEPTION_DIM) for name in _FEATURES}
        self.saved = 0

    def add(self, batch: pa.Table) -> None:
        self.usage.add(batch)
        failed = batch.column("error").is_valid()
        self.errors.extend(batch.filter(failed).select(["path", "reason", "error"]).to_pylist())
        ok = batch.filter(pc.invert(failed))
        if not ok.num_rows:
            return
        if _FEATURES[0] in ok.column_names:
            for name, stats in self.features.items():
                column = ok.column(name).combine_chunks()
                stats.add(column.values.to_numpy(zero_copy_only=False).reshape(-1, INCEPTION_DIM))
        self.rows.append(ok.select(["path", "label", "width", "height", *PER_IMAGE_METRICS]))
        for row in ok.filter(ok.column("reconstruction").is_valid()).to_pylist():
            self._save(row)

    def _save(self, row: Mapping[str, Any]) -> None:
        shape = (self.size, self.size, 3)
        pair = np.concatenate([np.frombuffer(row[k], np.uint8).reshape(shape) for k in ("image", "reconstruction")], 1)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.save_index[row['path']]:06d}_{_stem(row['path'])}.png"
        (self.images_dir / name).write_bytes(to_png_bytes(pair))
        self.saved += 1

    def per_image(self) -> pa.Table:
        schema = pa.schema(
            [("path", pa.string()), ("label", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
            + [(name, pa.float64()) for name in PER_IMAGE_METRICS]
        )
        table = pa.concat_tables(self.rows) if self.rows else schema.empty_table()
        return sort_by_path(table, self.order)


def _stem(path: str) -> str:
    """The name part of a saved PNG: the file's stem, or ``<shard>_<key>`` for a sample."""
    file = source_of(path)
    if file == path:
        return Path(path).stem[:80]
    return re.sub(r"[^\w.-]", "_", f"{Path(file).name.split('.')[0]}_{path[len(file) + 1 :]}")[:80]


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


def evaluate_dataset(
    inputs: str | Sequence[str],
    output: str | os.PathLike[str],
    spec: PipelineSpec,
    *,
    save_images: int = 0,
    inception_weights: str | os.PathLike[str] | None = None,
    lpips_weights: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Reconstruct every image named by ``inputs`` and measure the reconstruction quality.

    ``output`` is a local directory (created; its report is replaced). ``inception_weights`` / ``lpips_weights``
    (default: env ``VTP_INCEPTION_WEIGHTS`` / ``VTP_LPIPS_WEIGHTS``) enable rFID and LPIPS; without them those
    metrics are skipped and the report says what is missing. The weight files must be readable at the same path
    on every node. ``save_images``: write the first N inputs as reference | reconstruction PNGs in
    ``output/images``.

    ``inputs`` are files (directories, globs, manifests: ``sources.files``) or webdataset shards / parquet files
    with image bytes (``sources.webdataset``, ``sources.parquet``; local or any pyarrow URI, read through
    ``spec.filesystem``).

    Returns the report (also written to ``output/report.json``).
    """
    started = time.perf_counter()
    if save_images < 0:
        raise ValueError(f"save_images must be >= 0, got {save_images}")
    inception = resolve_weights(inception_weights, INCEPTION_ENV, "FID Inception", "--inception-weights")
    lpips = resolve_weights(lpips_weights, LPIPS_ENV, "LPIPS", "--lpips-weights")
    # Checked here, before Ray starts: a missing package would otherwise fail inside every worker.
    require_eval_dependencies({"psnr", "ssim"} | ({"rfid"} if inception else set()) | ({"lpips"} if lpips else set()))
    skipped: dict[str, str] = {}
    if inception is None:
        skipped["rfid"] = f"no FID Inception weights: pass --inception-weights PATH or set {INCEPTION_ENV}"
    if lpips is None:
        skipped["lpips"] = f"no LPIPS weights: pass --lpips-weights PATH or set {LPIPS_ENV}"
    for metric, reason in skipped.items():
        log.warning("%s skipped: %s", metric, reason)
    source = find_source(inputs, spec)
    if isinstance(source, SampleSource):  # streamed: the outputs are sorted by identity, the images saved are the
        samples, found, order = source, None, sample_sort_key  # first samples
        saved = source.first_samples(save_images) if save_images else []
    else:
        samples, found, order = None, source, source.position()
        saved = source.table.column("path").to_pylist()[:save_images]
    model = ModelFacts.of(spec.model, spec.preprocessing.size)
    out = Path(output).expanduser()
    collector = _Collector(out / IMAGES, spec.preprocessing.size, order, saved)
    worker = {
        "inception_weights": str(inception) if inception else None,
        "lpips_weights": str(lpips) if lpips else None,
        "save_paths": frozenset(saved),
    }
    with run_pipeline(spec, source, EvalWorker, model, worker) as (placement, batches):
        for batch in batches:
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
    reference, reconstruction = collector.features.values()
    if inception is not None:
        if reference.count >= 2:
            metrics["rfid"] = reference.frechet_to(reconstruction)
        else:
            skipped["rfid"] = f"rFID needs at least 2 images, {reference.count} were evaluated"
    usage = collector.usage.stats()
    report = {
        **run_header(inputs, model, spec, placement),
        **({"source": samples.description()} if samples else {}),
        "metric_weights": {
            "inception": str(inception) if inception else None,
            "lpips": str(lpips) if lpips else None,
        },
        "metric_definitions": {
            "psnr": "per image on uint8 pixels, peak 255",
            "ssim": "torchmetrics, 11x11 Gaussian (sigma 1.5), data_range 1.0 on [0, 1]",
            "lpips": "LPIPS v0.1 (VGG16 or AlexNet, as the weights file holds) on uint8 images scaled to [-1, 1]",
            "rfid": "pytorch-fid's FID Inception (pool3, 2048-d) on uint8 images; Frechet distance of the two sets",
        },
        "counts": {
            **input_counts(found, collector.usage.processed),
            "evaluated": per_image.num_rows,
            "errors": len(collector.errors),
            "errors_by_reason": dict(Counter(e["reason"] for e in collector.errors)),
            "saved_images": collector.saved,
        },
        "metrics": metrics,
        "skipped_metrics": skipped,
        "errors": sorted(collector.errors, key=lambda e: order(e["path"])),
        "replicas": usage["replicas"],
        "replica_model_s": usage["replica_model_s"],
        "compile": {"mode": spec.compile, "compiled_rows": usage["compiled_rows"], "eager_rows": usage["eager_rows"]},
        "seconds": round(seconds, 3),
        "images_per_s": round(usage["processed"] / seconds, 3),
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, frozenset, set)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
