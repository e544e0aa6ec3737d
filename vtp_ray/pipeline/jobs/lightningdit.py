"""LightningDiT-ready latents: the shards and stats file LightningDiT's ``ImgLatentDataset`` reads.

Layout (``data.data_path`` of upstream VTP's ``train_lightningdit_vtp.py`` points at DIR)::

    DIR/latents_rank00_shard000.safetensors  latents, latents_flip float32 (N, C, h, w); labels int64 (N,)
    DIR/latents_stats.pt                     {"mean", "std"}: float32 (1, C, 1, 1), exact over every row's latents
    DIR/classes.txt                          the class names, line i = label i (ImageFolder: sorted directory names);
                                             not written for sample sources, whose labels are their own class ids
    DIR/manifest.json, errors.parquet, stats.json, _errors/   as in the parquet layout (``store``)

``ShardStore`` is ``store.LatentStore`` with safetensors shards as its data parts (its extension points
``list_parts``, ``read_part``, ``write_rows``, ``layout_files``): each shard is written under a hidden temporary
name and renamed, so it exists whole or not at all; its safetensors metadata carries the
manifest, the run, the input paths of its rows (what resuming skips) and its latent statistics, merged exactly at
the end. LightningDiT estimates ``mean`` / ``std`` from 10,000 random rows with ``torch.std`` (Bessel-corrected);
here they are computed over every row (same correction), and LightningDiT uses the file as it finds it.

From sample sources (webdataset shards, parquet with image bytes) the labels are the samples' integer class ids
(``cls`` member / ``label`` column, as ImageNet shards store 0..999), stored as they are: the manifest says so
(``classes`` null, ``labels`` = ``SOURCE_LABELS``) and there are no names to write in ``classes.txt``.
"""

from __future__ import annotations

import datetime
import io
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors.numpy import save as save_safetensors

from ...words import plural
from ..latent_stats import ChannelStats
from ..sources import resolve_location
from ..store import FORMAT as STORE_FORMAT
from ..store import (
    MANIFEST_FILE,
    METADATA_KEY,
    STATS_KEY,
    DataPart,
    LatentStore,
    OutputMismatchError,
)

__all__ = [
    "CLASSES_FILE",
    "FORMAT",
    "LATENT_STATS_FILE",
    "SOURCE_LABELS",
    "ExportSummary",
    "ShardStore",
    "check_labels",
    "export_lightningdit",
    "lightningdit_manifest",
    "read_shard_metadata",
]

FORMAT = "vtp-ray-lightningdit"
LATENT_STATS_FILE = "latents_stats.pt"
CLASSES_FILE = "classes.txt"
PATHS_KEY = "vtp_ray.paths"
SOURCE_LABELS = "the samples' own integer class ids (cls member / label column), stored as they are"
_SHARD = re.compile(r"latents_rank(\d{2})_shard(\d{3,})\.safetensors")


def shard_name(index: int) -> str:
    """Upstream's ``extract_features_vtp.py`` name, one writer (rank 00)."""
    return f"latents_rank00_shard{index:03d}.safetensors"


def check_labels(labels: pa.Array | pa.ChunkedArray, option: str) -> list[str]:
    """The sorted class names of ``labels`` (ImageFolder's order); a missing label is an error naming ``option``."""
    missing = labels.null_count
    if missing:
        raise ValueError(f"the lightningdit format needs a class label for every input, {missing} have none: {option}")
    return sorted(pc.unique(labels).to_pylist())


def read_shard_metadata(fs: pafs.FileSystem, path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header alone (8-byte length, then JSON)."""
    with fs.open_input_file(path) as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length)).get("__metadata__") or {}


class ShardStore(LatentStore):
    """An output directory of LightningDiT shards, resumable exactly like ``LatentStore``'s parquet parts.

    The manifest must hold ``classes`` (label i = ``classes[i]``), or ``labels`` = ``SOURCE_LABELS`` (the rows'
    labels are integer class ids already), ``flip`` true and float32 latents.
    """

    def __init__(self, output: str, manifest: Mapping[str, Any], *, overwrite: bool = False) -> None:
        if not manifest.get("flip"):
            raise ValueError("the lightningdit format needs flipped latents too (LightningDiT trains on both): --flip")
        if manifest.get("latent_dtype") != "float32":
            raise ValueError("the lightningdit format stores float32 latents (LightningDiT's dtype): --dtype float32")
        if not manifest.get("classes") and manifest.get("labels") != SOURCE_LABELS:
            raise ValueError("the lightningdit format needs the class list in the manifest")
        self.classes = pa.array(manifest["classes"], pa.string()) if manifest.get("classes") else None
        super().__init__(output, {**manifest, "format": FORMAT}, overwrite=overwrite)

    layout_files = (*LatentStore.layout_files, LATENT_STATS_FILE, CLASSES_FILE)

    # ----------------------------------------------------------------------------------- the journal

    def list_parts(self) -> list[tuple[int, str]]:
        """``(index, path)`` of the finished shards; removes a killed run's half-written one."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return []
        shards = []
        for entry in self.fs.get_file_info(pafs.FileSelector(self.root)):
            if entry.base_name.startswith(".latents_rank") and entry.base_name.endswith(".tmp"):
                self.fs.delete_file(entry.path)
            elif match := _SHARD.fullmatch(entry.base_name):
                shards.append((int(match.group(2)), entry.path))
        return sorted(shards)

    def read_part(self, path: str) -> DataPart:
        """From the shard's safetensors header alone."""
        try:
            metadata = read_shard_metadata(self.fs, path)
            paths = pa.array(json.loads(metadata[PATHS_KEY]), pa.string())
            stats = ChannelStats.from_json(metadata[STATS_KEY.decode()])
        except (OSError, ValueError, KeyError) as e:
            raise OutputMismatchError(f"{path} is not a shard of this tool ({e}): delete it and re-run") from e
        return DataPart(posixpath.basename(path), len(paths), stats, paths)

    def write_rows(self, index: int, rows: pa.Table, run: Mapping[str, Any]) -> DataPart:
        name = shard_name(index)
        shape = (rows.num_rows, *self.manifest["columns"]["latents"]["shape"])
        latents = self._column(rows, "latents").reshape(shape)
        labels = self._labels(rows.column("label"))
        stats = ChannelStats.of(latents)
        paths = rows.column("path").combine_chunks()
        tensors = {
            "latents": latents,
            "latents_flip": self._column(rows, "latents_flip").reshape(shape),
            "labels": labels.to_numpy().astype(np.int64),
        }
        metadata = {
            "total_size": str(rows.num_rows),  # upstream's extraction writes these three
            "dtype": "torch.float32",
            "device": "cpu",
            METADATA_KEY.decode(): json.dumps({**self.manifest, "run": dict(run)}),
            STATS_KEY.decode(): stats.to_json(),
            PATHS_KEY: json.dumps(paths.to_pylist()),
        }
        # safetensors.numpy writes each array's buffer as is: they must be C-contiguous.
        data = save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
        self.atomic_write(self.path(name), lambda f: f.write(data))
        return DataPart(name, rows.num_rows, stats, paths)

    def _labels(self, labels: pa.ChunkedArray) -> pa.ChunkedArray:
        """The int64 labels of rows: class ids as they are (sample sources), or indices in ``classes``."""
        if self.classes is None:
            if labels.null_count:
                raise ValueError(f"{labels.null_count} rows have no class id")
            return labels.cast(pa.int64())  # canonical decimal text, checked as the samples were read
        indices = pc.index_in(labels, value_set=self.classes)
        if indices.null_count:
            unknown = pc.filter(labels, indices.is_null()).unique().to_pylist()
            raise ValueError(f"labels {unknown[:5]} are not in the output's classes")
        return indices

    @staticmethod
    def _column(rows: pa.Table, name: str) -> np.ndarray:
        return rows.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

    def finalize(self, last_run: Mapping[str, Any]) -> dict[str, Any]:
        """As ``LatentStore.finalize``, then ``latents_stats.pt`` (over every row) and ``classes.txt`` (when the
        class names are known)."""
        result = super().finalize(last_run)
        if not self.has_manifest:
            return result
        if self.classes is not None:
            text = "".join(f"{name}\n" for name in self.classes.to_pylist())
            self.atomic_write(self.path(CLASSES_FILE), lambda f: f.write(text.encode()))
        stats = self.latent_stats()
        if stats.count > 1:
            self._write_latent_stats(stats)
            result["latents_stats"] = {
                "file": LATENT_STATS_FILE,
                "over": "every row's latents, all positions, per channel; std Bessel-corrected as torch.std",
            }
        return result

    def _write_latent_stats(self, stats: ChannelStats) -> None:
        import torch  # the driver only; written as LightningDiT's torch.save of two (1, C, 1, 1) tensors

        std = np.sqrt(stats.m2 / (stats.count - 1))
        tensors = {
            "mean": torch.from_numpy(stats.mean.astype(np.float32).reshape(1, -1, 1, 1)),
            "std": torch.from_numpy(std.astype(np.float32).reshape(1, -1, 1, 1)),
        }
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        self.atomic_write(self.path(LATENT_STATS_FILE), lambda f: f.write(buffer.getvalue()))


def lightningdit_manifest(manifest: Mapping[str, Any], classes: Sequence[str] | None) -> dict[str, Any]:
    """A parquet-layout manifest (``tokenize.build_manifest``) as a shard directory's; ``classes`` None: the labels
    are the samples' own class ids (``SOURCE_LABELS``)."""
    if classes is None:
        return {**manifest, "format": FORMAT, "classes": None, "labels": SOURCE_LABELS}
    return {**manifest, "format": FORMAT, "classes": list(classes)}


# ------------------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class ExportSummary:
    """What ``export_lightningdit`` did; ``rows`` and ``errors`` count the whole output directory."""

    output: str
    exported: int  # rows converted by this run
    skipped: int  # rows already in the output from an earlier run
    rows: int
    errors: int
    classes: int

    def line(self) -> str:
        return (
            f"export: {self.exported} rows converted, {self.skipped} already there; output {self.output}: "
            f"{plural(self.rows, 'row')} in LightningDiT shards, {plural(self.errors, 'error')} carried over, "
            f"{plural(self.classes, 'class')}"
        )


def export_lightningdit(
    source: str, output: str, *, rows_per_file: int = 10_000, overwrite: bool = False
) -> ExportSummary:
    """Convert a ``vtp-ray tokenize`` parquet output into LightningDiT shards, without recomputing anything.

    The source needs ``latents_flip`` (``tokenize --flip``) and a label on every row. Its errors are carried over,
    so rows + errors still account for every input; re-running resumes, as tokenize does.
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    fs, root = resolve_location(source)
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST_FILE)) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} has no {MANIFEST_FILE}: not a vtp-ray tokenize output") from None
    if manifest.get("format") != STORE_FORMAT:
        raise ValueError(f"{source} is a {manifest.get('format')!r} output, not a parquet one")
    if not manifest.get("flip"):
        raise ValueError(f"{source} has no latents_flip: tokenize it again with --flip (LightningDiT trains on both)")
    if manifest.get("latent_dtype") != "float32":
        raise ValueError(f"{source} holds {manifest.get('latent_dtype')} latents; LightningDiT's shards are float32")
    parts = LatentStore(source, manifest)
    data = parts.data_files()
    labels = pa.chunked_array(
        [pq.read_table(path, columns=["label"], filesystem=fs).column("label").combine_chunks() for path in data],
        pa.string(),
    )
    classes = check_labels(labels, "tokenize with --labels-from-dirs, or with a manifest that has a label column")
    store = ShardStore(output, lightningdit_manifest(manifest, classes), overwrite=overwrite)
    done = store.done_paths().combine_chunks()
    run = {"exported_from": source, "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    columns = store.schema.names
    exported = skipped = 0
    pending: list[pa.Table] = []
    errors = parts.merged_errors()
    errors = errors.filter(pc.invert(pc.is_in(errors.column("path"), value_set=done)))

    def flush() -> None:
        nonlocal pending, errors
        store.write_manifest(device=manifest.get("device"))
        store.write_part(pa.concat_tables(pending) if pending else store.schema.empty_table(), errors, run)
        pending, errors = [], errors.slice(0, 0)

    for path in data:
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=1024, columns=columns):
            table = pa.Table.from_batches([batch])
            keep = pc.invert(pc.is_in(table.column("path"), value_set=done))
            skipped += table.num_rows - (pc.sum(keep).as_py() or 0)
            table = table.filter(keep)
            while table.num_rows:
                room = rows_per_file - sum(t.num_rows for t in pending)
                pending.append(table.slice(0, room))
                table = table.slice(room)
                if sum(t.num_rows for t in pending) >= rows_per_file:
                    exported += rows_per_file
                    flush()
    exported += sum(t.num_rows for t in pending)
    if pending or errors.num_rows:
        flush()
    stats = store.finalize({**run, "exported": exported})
    return ExportSummary(output, exported, skipped, stats["rows"], stats["errors"], len(classes))
