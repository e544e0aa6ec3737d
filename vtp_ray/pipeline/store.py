"""The output directory of a tokenization job, written so that a killed job loses nothing and resumes.

Layout::

    DIR/manifest.json              what made the latents: model, config digest, precision, preprocessing, version
    DIR/data/part-00000.parquet    one row per image (``pd.read_parquet("DIR/data")``)
    DIR/errors.parquet             path, reason, error: one row per input that could not become an image
    DIR/stats.json                 counts, throughput, per-channel latent mean / std
    DIR/_errors/part-00000.parquet the error rows of each flush, from which errors.parquet is rebuilt

Data parts and error parts are the journal: each is written under a hidden temporary name and renamed into
place, so a part exists completely or not at all, and the paths in them are exactly the inputs that are done.
``errors.parquet`` and ``stats.json`` are views of the journal, rebuilt at the end of every run. Each data part
carries the manifest, the run that wrote it and its own latent statistics (count, mean, M2 per channel) in its
file metadata, so statistics over all runs are merged exactly without reading latents back.

Another layout of data parts (LightningDiT's safetensors shards: ``jobs.lightningdit.ShardStore``) subclasses
``LatentStore`` and overrides its extension points: ``list_parts`` (which finished parts there are),
``read_part`` (a part's row paths and statistics, for resuming), ``write_rows`` (write one part) and
``layout_files`` (what ``overwrite`` deletes besides the parts); the journal of errors, the manifest check and the
views stay the store's.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .latent_stats import ChannelStats
from .sources import resolve_location

__all__ = [
    "DATA_DIR",
    "ERRORS_FILE",
    "ERROR_SCHEMA",
    "LATENT_DTYPES",
    "MANIFEST_FILE",
    "METADATA_KEY",
    "STATS_FILE",
    "STATS_KEY",
    "DataPart",
    "LatentStore",
    "OutputMismatchError",
    "row_schema",
]

log = logging.getLogger(__name__)

FORMAT = "vtp-ray-latents"
FORMAT_VERSION = 1
DATA_DIR = "data"
ERROR_PARTS_DIR = "_errors"
ERRORS_FILE = "errors.parquet"
STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.json"
METADATA_KEY = b"vtp_ray"
STATS_KEY = b"vtp_ray.latent_stats"
LATENT_DTYPES: Mapping[str, pa.DataType] = {"float32": pa.float32(), "float16": pa.float16()}

ERROR_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)

# Manifest entries that must be equal for a run to add rows to an existing output: anything that changes the
# numbers or the schema. The device is left out on purpose (NPU, GPU and CPU agree to well under 1%).
RESUME_KEYS = (
    "format",
    "format_version",
    "model",
    "precision",
    "preprocessing",
    "flip",
    "latent_dtype",
    "columns",
    "classes",
)
_MODEL_RESUME_KEYS = ("name", "config_digest", "random_weights", "rope_dtype")

_PART = re.compile(r"part-(\d{5,})\.parquet")
_PARQUET_OPTIONS: dict[str, Any] = {
    # Latents are noise-like floats that no codec shrinks; compress only the string columns.
    "compression": {"path": "zstd", "label": "zstd", "reason": "zstd", "error": "zstd", "caption": "zstd"},
    "use_dictionary": ["label", "reason"],
    "row_group_size": 256,  # about 17 MB of float32 VTP-Small latents: a sensible unit for shuffled reading
}


class OutputMismatchError(ValueError):
    """The output directory holds results made differently from what this run would make."""


def row_schema(manifest: Mapping[str, Any]) -> pa.Schema:
    """The Arrow schema of the data parts described by ``manifest``.

    Latents are flat ``fixed_size_list`` columns (plain Parquet lists, readable anywhere); their shape is in the
    field metadata and in the manifest.
    """
    columns = manifest["columns"]
    latent_type = LATENT_DTYPES[manifest["latent_dtype"]]
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    for name in ("latents", "latents_flip"):
        if name in columns:
            shape = columns[name]["shape"]
            fields.append(
                pa.field(
                    name,
                    pa.list_(pa.field("item", latent_type, nullable=False), int(np.prod(shape))),
                    nullable=False,
                    metadata={"shape": json.dumps(shape)},
                )
            )
    if "clip_embedding" in columns:
        (dim,) = columns["clip_embedding"]["shape"]
        fields.append(
            pa.field(
                "clip_embedding",
                pa.list_(pa.field("item", pa.float32(), nullable=False), dim),
                nullable=False,
                metadata={"shape": json.dumps([dim])},
            )
        )
    if "caption" in columns:
        fields.append(pa.field("caption", pa.string()))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class DataPart:
    """One finished data part: its file name, how many rows it holds, their latent statistics and input paths."""

    name: str
    rows: int
    stats: ChannelStats
    paths: pa.Array


def _resume_view(manifest: Mapping[str, Any]) -> dict[str, Any]:
    view = {key: manifest.get(key) for key in RESUME_KEYS}
    view["model"] = {key: (manifest.get("model") or {}).get(key) for key in _MODEL_RESUME_KEYS}
    return view


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [
            d
            for key in sorted(set(old) | set(new))
            for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} there, {new!r} now"]


class LatentStore:
    """One output directory: checks that a run may add to it, knows which inputs are done, writes parts.

    Args:
        output: a local directory or a URI (``s3://bucket/prefix``) pyarrow can write to.
        manifest: what this run makes (see ``jobs.tokenize.build_manifest``); compared with the stored one.
        overwrite: delete this layout's files first (other files in ``output`` are left alone).

    Raises ``OutputMismatchError`` when ``output`` was made with a different model, precision, preprocessing or
    schema, or holds parts but no manifest.

    A subclass stores its data parts another way by overriding ``list_parts``, ``read_part``, ``write_rows`` and
    ``layout_files``, using ``path``, ``exists`` and ``atomic_write``.
    """

    #: The files of the layout besides the data and error parts: what ``overwrite`` deletes.
    layout_files: tuple[str, ...] = (MANIFEST_FILE, ERRORS_FILE, STATS_FILE)

    def __init__(self, output: str, manifest: Mapping[str, Any], *, overwrite: bool = False) -> None:
        self.output = output
        self.fs, self.root = resolve_location(output)
        self.root = self.root.rstrip("/") or "/"
        self.manifest = dict(manifest)
        self.schema = row_schema(self.manifest)
        self.channels = int(self.manifest["columns"]["latents"]["shape"][0])
        if overwrite:
            self._delete_layout()
        stored = self._read_manifest()
        self._parts: list[DataPart] = []
        self._error_parts: list[pa.Table] = []
        self._next_index = 0
        if stored is None:
            if self._has_results():
                raise OutputMismatchError(
                    f"{output} holds tokenization results but no {MANIFEST_FILE}, so nothing says what made them: "
                    "use another --output, or --overwrite to start again"
                )
        else:
            diffs = _differences(_resume_view(stored), _resume_view(self.manifest))
            if diffs:
                raise OutputMismatchError(
                    f"{output} was made differently from this run ({'; '.join(diffs)}): resuming would mix "
                    "incompatible latents. Use another --output, or --overwrite to start again"
                )
            self.manifest = {**stored, "vtp_ray_version": self.manifest.get("vtp_ray_version")}
            self._load()
        self._has_manifest = stored is not None

    @property
    def has_manifest(self) -> bool:
        """Whether ``manifest.json`` is written (resuming, or since this run's first part)."""
        return self._has_manifest

    # -------------------------------------------------------------------------------- extension points

    def list_parts(self) -> list[tuple[int, str]]:
        """``(index, path)`` of the finished data parts, by index; removes the leftovers of a killed run."""
        return self._list(DATA_DIR)

    def read_part(self, path: str) -> DataPart:
        """What resuming needs of a finished data part: its row paths and latent statistics (not its latents)."""
        try:
            with self.fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                metadata = parquet.schema_arrow.metadata or {}
                paths = parquet.read(columns=["path"]).column("path").combine_chunks()
        except (OSError, pa.ArrowInvalid) as e:
            raise OutputMismatchError(f"{path} is unreadable ({e}): delete it and re-run to redo its rows") from e
        stats = ChannelStats.from_json(metadata[STATS_KEY]) if STATS_KEY in metadata else self._stats_of(path)
        return DataPart(posixpath.basename(path), len(paths), stats, paths)

    def write_rows(self, index: int, rows: pa.Table, run: Mapping[str, Any]) -> DataPart:
        """Write the data part numbered ``index`` (``rows`` already cast to ``self.schema``, at least one) with the
        manifest and ``run`` in its metadata, atomically; return what it holds."""
        name = f"part-{index:05d}.parquet"
        stats = ChannelStats.of(self._latents(rows))
        metadata = {
            METADATA_KEY: json.dumps({**self.manifest, "run": dict(run)}).encode(),
            STATS_KEY: stats.to_json().encode(),
        }
        self._write_parquet(self.path(DATA_DIR, name), rows.replace_schema_metadata(metadata))
        return DataPart(name, rows.num_rows, stats, rows.column("path").combine_chunks())

    # ---------------------------------------------------------------------------------------- helpers

    def path(self, *parts: str) -> str:
        """A path inside the output directory (in ``self.fs``)."""
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        """Whether ``path(*parts)`` exists."""
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def atomic_write(self, path: str, write: Callable[[Any], Any]) -> None:
        """``write(stream)`` to a hidden temporary file next to ``path``, then rename it to ``path``: the file
        appears whole or not at all."""
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, f".{name}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            write(f)
        self.fs.move(tmp, path)  # a rename on local disks

    def _list(self, directory: str) -> list[tuple[int, str]]:
        """``(index, path)`` of the finished parts in ``directory``, by index; removes a killed run's leftovers."""
        info = self.fs.get_file_info(self.path(directory))
        if info.type != pafs.FileType.Directory:
            return []
        parts = []
        for entry in self.fs.get_file_info(pafs.FileSelector(self.path(directory))):
            if entry.base_name.startswith(".") and entry.base_name.endswith(".tmp"):
                self.fs.delete_file(entry.path)  # a part that was being written when the job died
            elif match := _PART.fullmatch(entry.base_name):
                parts.append((int(match.group(1)), entry.path))
        return sorted(parts)

    def _has_results(self) -> bool:
        # Parquet parts count for any layout: a directory of another layout may hold them too.
        return bool(
            self.list_parts() or self._list(DATA_DIR) or self._list(ERROR_PARTS_DIR) or self.exists(ERRORS_FILE)
        )

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.exists(MANIFEST_FILE):
            return None
        with self.fs.open_input_stream(self.path(MANIFEST_FILE)) as f:
            try:
                return json.loads(f.read())
            except json.JSONDecodeError as e:
                raise OutputMismatchError(f"{self.output}/{MANIFEST_FILE} is not valid JSON ({e})") from e

    def _delete_layout(self) -> None:
        for _, path in self.list_parts():
            self.fs.delete_file(path)
        for directory in (DATA_DIR, ERROR_PARTS_DIR):
            if self.exists(directory):
                self.fs.delete_dir(self.path(directory))
        for name in self.layout_files:
            if self.exists(name):
                self.fs.delete_file(self.path(name))

    def _load(self) -> None:
        for index, path in self.list_parts():
            self._parts.append(self.read_part(path))
            self._next_index = max(self._next_index, index + 1)
        for index, path in self._list(ERROR_PARTS_DIR):
            with self.fs.open_input_file(path) as f:
                self._error_parts.append(pq.read_table(f).cast(ERROR_SCHEMA))
            self._next_index = max(self._next_index, index + 1)

    def _stats_of(self, path: str) -> ChannelStats:
        with self.fs.open_input_file(path) as f:
            return ChannelStats.of(self._latents(pq.read_table(f, columns=["latents"])))

    def _latents(self, rows: pa.Table) -> np.ndarray:
        values = rows.column("latents").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return values.reshape(rows.num_rows, self.channels, -1)

    # ------------------------------------------------------------------------------------------- state

    def row_paths(self) -> pa.ChunkedArray:
        """The paths of every row written so far, all runs."""
        return pa.chunked_array([p.paths for p in self._parts], pa.string())

    def data_files(self) -> list[str]:
        """The paths (in this store's filesystem) of the parquet data parts, in order."""
        return [self.path(DATA_DIR, part.name) for part in self._parts]

    def error_paths(self) -> pa.ChunkedArray:
        return pa.chunked_array([t.column("path").combine_chunks() for t in self._error_parts], pa.string())

    def latent_stats(self) -> ChannelStats:
        """The latent statistics of every row written so far, all runs (merged from the parts, exactly)."""
        stats = ChannelStats.empty(self.channels)
        for part in self._parts:
            stats = stats.merge(part.stats)
        return stats

    def done_paths(self, retry_errors: bool = False) -> pa.ChunkedArray:
        """Inputs a run skips: those with a row, and (unless ``retry_errors``) those with an error."""
        if retry_errors:
            return self.row_paths()
        return pa.chunked_array([*self.row_paths().chunks, *self.error_paths().chunks], pa.string())

    # ------------------------------------------------------------------------------------------ writing

    def write_manifest(self, **facts: Any) -> None:
        """Write ``manifest.json`` (with ``facts`` such as the device) unless resuming; idempotent."""
        if self._has_manifest:
            return
        self.manifest.update(facts)
        self.fs.create_dir(self.root, recursive=True)
        text = json.dumps(self.manifest, indent=2, sort_keys=False) + "\n"
        self.atomic_write(self.path(MANIFEST_FILE), lambda f: f.write(text.encode()))
        self._has_manifest = True

    def write_part(self, rows: pa.Table, errors: pa.Table, run: Mapping[str, Any]) -> None:
        """Write one flush: ``rows`` (``row_schema``) to a data part, ``errors`` (``ERROR_SCHEMA``) to an error part."""
        if not self._has_manifest:
            raise RuntimeError("write_manifest() must come before the first part")
        index, self._next_index = self._next_index, self._next_index + 1
        name = f"part-{index:05d}.parquet"
        if errors.num_rows:
            errors = errors.cast(ERROR_SCHEMA)
            self._write_parquet(self.path(ERROR_PARTS_DIR, name), errors)
            self._error_parts.append(errors)
        if rows.num_rows:
            self._parts.append(self.write_rows(index, rows.cast(self.schema), run))

    def _write_parquet(self, path: str, table: pa.Table) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        options = {
            **_PARQUET_OPTIONS,
            "compression": {k: v for k, v in _PARQUET_OPTIONS["compression"].items() if k in table.column_names},
            "use_dictionary": [c for c in _PARQUET_OPTIONS["use_dictionary"] if c in table.column_names],
        }
        self.atomic_write(path, lambda f: pq.write_table(table, f, **options))

    # ------------------------------------------------------------------------------------------ views

    def merged_errors(self) -> pa.Table:
        """Every input that ended as an error, once (its latest error), unless it has a row since (``retry_errors``)."""
        if not self._error_parts:
            return ERROR_SCHEMA.empty_table()
        errors = pa.concat_tables(self._error_parts)
        errors = errors.filter(pc.invert(pc.is_in(errors.column("path"), value_set=self.row_paths().combine_chunks())))
        latest = {row["path"]: row for row in errors.to_pylist()}  # a retried input keeps its latest error
        return pa.Table.from_pylist(list(latest.values()), schema=ERROR_SCHEMA)

    def finalize(self, last_run: Mapping[str, Any]) -> dict[str, Any]:
        """Rebuild ``errors.parquet`` and ``stats.json`` from the journal; return the stats."""
        errors = self.merged_errors()
        if self._has_manifest:
            self._write_parquet(self.path(ERRORS_FILE), errors)
        stats = self.latent_stats()
        row_paths = self.row_paths()
        reasons = pc.value_counts(errors.column("reason"))
        latents = self.manifest["columns"]["latents"]
        result = {
            "rows": len(row_paths),
            "errors": errors.num_rows,
            "errors_by_reason": {str(r["values"]): int(r["counts"]) for r in reasons.to_pylist()},
            "duplicate_rows": len(row_paths) - len(pc.unique(row_paths)),
            "parts": len(self._parts),
            "latents": {
                "shape": latents["shape"],
                "dtype": self.manifest["latent_dtype"],
                "count": stats.count,
                "mean": stats.mean.tolist(),
                "std": stats.std.tolist(),
                "over": "every row's latents (not latents_flip), all positions, per channel; std with ddof=0",
            },
            "last_run": dict(last_run),
        }
        if self._has_manifest:
            text = json.dumps(result, indent=2) + "\n"
            self.atomic_write(self.path(STATS_FILE), lambda f: f.write(text.encode()))
        return result
