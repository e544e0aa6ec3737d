"""The fast mode's first half: every train and val image's probe features, extracted once and stored.

A Ray Data pass reads both sets with the evaluation transform (resize + center crop, no augmentation: the fast
mode is *not* upstream's protocol) into a pool of ``FeatureWorker`` actors, each holding one ``VTPReplica``
(``pipeline.worker.ModelStage``); the driver writes the features as parquet parts, ``DIR/<set>/part-NNNNN.parquet``
(``path, target, features``: float32, the class tokens of the last ``max_blocks`` blocks and the patch-token mean),
then ``DIR/<set>/done.json``. A re-run with the same identity finds them there and extracts nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..pipeline.runner import Placement, ReplicaUsage, replica_stage
from ..pipeline.spec import ModelFacts, PipelineSpec
from ..pipeline.stages import fixed_size_lists
from ..pipeline.worker import ModelStage
from .data import ProbeSet, block_rows_for, feature_set, validation_dataset
from .reads import FEATURES
from .settings import ProbeSettings

__all__ = ["DONE", "FeatureWorker", "extract_features"]

DONE = "done.json"
#: Bytes of features per stored part: parts are the units the training stream shuffles whole.
PART_BYTES = 64 * 2**20


class FeatureWorker(ModelStage):
    """The model stage of the extraction: ``heads.probe_features`` of each batch, at the probe's precision (``auto``
    resolved on this replica's device)."""

    def __init__(
        self, *, spec: PipelineSpec, device: str, expected: dict[str, Any], max_blocks: int, precision: str,
        **base: Any,
    ) -> None:  # fmt: skip
        import torch

        from .worker import resolve_probe_precision

        resolved = resolve_probe_precision(precision, torch.device(device))
        super().__init__(spec=replace(spec, precision=resolved), device=device,
                         expected={**expected, "precision": resolved}, **base)  # fmt: skip
        self.max_blocks = max_blocks
        self.width = (max_blocks + 1) * self.replica.model.config.vision_embed_dim

    def process(self, images: np.ndarray, rows: pa.Table) -> np.ndarray:
        import torch

        from .heads import probe_features

        batch = torch.from_numpy(images).to(self.replica.device)
        return probe_features(self.replica.model, batch, self.max_blocks).cpu().numpy()

    def columns(self, batch: pa.Table, valid: np.ndarray, result: np.ndarray | None) -> pa.Table:
        out = batch.drop_columns(["image"])
        return out.append_column(FEATURES, fixed_size_lists(result, valid, pa.float32(), (self.width,)))


def extract_features(
    train: ProbeSet,
    val: ProbeSet,
    directory: Path,
    spec: PipelineSpec,
    settings: ProbeSettings,
    model: ModelFacts,
    identity: dict[str, Any],
) -> tuple[ProbeSet, ProbeSet, dict[str, Any]]:
    """``(train features, val features, what the extraction did)``: stored under ``directory``, or found there."""
    import ray

    started = time.perf_counter()
    wanted = json.loads(json.dumps({k: identity[k] for k in ("settings", "model", "train", "val")}))
    sets = {"train": train, "val": val}
    done = {name: _done(directory / name, wanted) for name in sets}
    stats: dict[str, Any] = {"reused": all(d is not None for d in done.values()), "errors": []}
    todo = [name for name, d in done.items() if d is None]
    if todo:
        placement = Placement.resolve(spec)
        cpus = ray.cluster_resources().get("CPU", 1)
        datasets = []
        for name in todo:
            shutil.rmtree(directory / name, ignore_errors=True)
            rows = block_rows_for(sets[name].total, settings.size, cpus, spec.preprocess_cpus)
            common = {
                "limits": spec.preprocessing.limits,
                "preprocess_cpus": spec.preprocess_cpus,
                "filesystem": spec.filesystem,
            }
            shuffled = name == "train"  # stored in a random order: the training stream shuffles parts whole
            datasets.append(validation_dataset(sets[name], settings, block_rows=rows, tag=name, shuffled=shuffled,
                                               **common))  # fmt: skip
        dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        writers = {name: _PartWriter(directory / name, settings.feature_dim(_embed_dim(spec))) for name in todo}
        usage = ReplicaUsage()
        for batch in _extracted(dataset, spec, settings, placement, model):
            usage.add(batch)
            for name, writer in writers.items():
                writer.add(batch.filter(pc.equal(batch.column("split"), name)))
        for name, writer in writers.items():
            done[name] = writer.finish(wanted)
        stats.update(replicas=usage.stats()["replicas"], replica_model_s=usage.stats()["replica_model_s"],
                     replica_options=placement.options, replica_pool=placement.replicas)  # fmt: skip
    for name in sets:
        stats["errors"].extend(done[name]["errors"])
    stats["images"] = {name: done[name]["rows"] for name in sets}
    stats["seconds"] = round(time.perf_counter() - started, 3)
    parts = {name: [str(directory / name / p) for p in done[name]["parts"]] for name in sets}
    return feature_set(train, parts["train"]), feature_set(val, parts["val"]), stats


def _embed_dim(spec: PipelineSpec) -> int:
    from ..model.source import read_spec

    return read_spec(spec.model).config.vision_embed_dim


def _done(directory: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    marker = directory / DONE
    if not marker.exists():
        return None
    done = json.loads(marker.read_text())
    return done if done.get("identity") == wanted else None


def _extracted(
    dataset: Any, spec: PipelineSpec, settings: ProbeSettings, placement: Placement, model: ModelFacts
) -> Iterator[pa.Table]:
    """The rows of ``dataset`` through a pool of ``FeatureWorker`` actors (the pipeline's replica stage)."""
    spec = replace(spec, preprocessing=replace(spec.preprocessing, size=settings.size))
    worker = {"max_blocks": settings.max_blocks, "precision": settings.precision}
    features = replica_stage(dataset, spec, placement, FeatureWorker, worker, model.identity(spec))
    yield from features.iter_batches(batch_format="pyarrow", batch_size=None)


class _PartWriter:
    """The rows of one set, in parquet parts of about ``PART_BYTES``; error rows kept apart."""

    def __init__(self, directory: Path, width: int) -> None:
        self.directory, self.rows_per_part = directory, max(1, PART_BYTES // (4 * width))
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.rows = 0

    def add(self, batch: pa.Table) -> None:
        failed = batch.column("error").is_valid()
        self.errors.extend(batch.filter(failed).select(["path", "reason", "error"]).to_pylist())
        ok = batch.filter(pc.invert(failed)).select(["path", "target", FEATURES])
        if ok.num_rows:
            self.pending.append(ok)
            self.pending_rows += ok.num_rows
            while self.pending_rows >= self.rows_per_part:
                self._write(self.rows_per_part)

    def _write(self, rows: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        part, rest = table.slice(0, rows), table.slice(rows)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.parts):05d}.parquet"
        pq.write_table(part, self.directory / name)
        self.parts.append(name)
        self.rows += part.num_rows
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def finish(self, identity: dict[str, Any]) -> dict[str, Any]:
        if self.pending_rows:
            self._write(self.pending_rows)
        if not self.parts:
            raise ValueError(f"no image of {self.directory.name} could be read: {self.errors[:3]}")
        done = {"identity": identity, "parts": self.parts, "rows": self.rows, "errors": self.errors}
        (self.directory / DONE).write_text(json.dumps(done) + "\n")
        return done
