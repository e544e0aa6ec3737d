"""Loose image files: the paths (and optional labels) named by directories, globs and manifests, and their read.

Every input becomes one ``(path, label)`` row. ``path`` is the input's identity everywhere (output rows, error
rows, resuming): an absolute local path, or a URI such as ``s3://bucket/key`` for any filesystem pyarrow
supports (``locations``). Sources:

- a directory: searched recursively for files with an image extension (hidden files and directories skipped);
  with ``labels_from_dirs`` the first-level sub-directory is the label, as torchvision's ``ImageFolder`` does;
- a glob (``*``, ``?``, ``[...]``; ``**`` spans directories): matching files, whatever their extension;
- a manifest: ``.txt`` / ``.lst`` (one path per line, ``#`` comments), ``.csv`` / ``.tsv`` or ``.parquet`` with a
  ``path`` column and an optional ``label`` column; relative paths are relative to the manifest's directory;
- a single image file.

The files are listed up front (``discover_inputs``), then read by Ray Data tasks in blocks of many model batches
(``Inputs.read``: ``preprocess_block``), each file read, loaded and cropped there (``preprocess_rows``).
"""

from __future__ import annotations

import io
import math
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..priority import job_priority
from ..spec import PipelineSpec, Preprocessing
from ..stages import block_rows, numbered_blocks, preprocess_images
from .locations import (
    InputError,
    file_identity,
    glob_files,
    has_glob,
    is_uri,
    list_files,
    read_bytes,
    relative_parts,
    resolve_location,
)

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "INPUT_SCHEMA",
    "MANIFEST_EXTENSIONS",
    "Inputs",
    "discover_inputs",
    "preprocess_block",
    "preprocess_rows",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
)
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".tsv", ".parquet"})
INPUT_SCHEMA = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("label", pa.string())])


@dataclass(frozen=True)
class Inputs:
    """Unique inputs in discovery order (``INPUT_SCHEMA``), and how many repeated paths were dropped."""

    table: pa.Table
    duplicates: int = 0

    def __len__(self) -> int:
        return self.table.num_rows

    def position(self) -> Callable[[str], int]:
        """path -> its index in discovery order: the order of a job's outputs."""
        return {p: i for i, p in enumerate(self.table.column("path").to_pylist())}.__getitem__

    def skipping(self, done: pa.Array) -> Inputs:
        """The inputs whose path is not in ``done`` (what a resumed run still reads)."""
        keep = pc.invert(pc.is_in(self.table.column("path"), value_set=done))
        return Inputs(self.table.filter(keep), self.duplicates)

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        """The Ray Data read of these files and the preprocess stage: one task per block of ``stages.block_rows``
        inputs, rows as ``preprocess_rows`` makes them."""
        import ray

        rows = block_rows(spec, self.table.num_rows, cpus)
        # One read task per block, made from block numbers: ray.data.from_arrow would run a metadata task per
        # block up front (minutes for millions of inputs). The input table goes through the object store once.
        blocks = math.ceil(self.table.num_rows / rows)
        return numbered_blocks(blocks).map_batches(
            preprocess_block,
            batch_format="pyarrow",
            batch_size=None,  # one block number per task
            **spec.preprocess_tasks(
                cpus,
                fn_kwargs={
                    "inputs": [ray.put(self.table)],
                    "block_rows": rows,
                    "preprocessing": spec.preprocessing,
                    "filesystem": spec.filesystem,
                },
            ),
        )


# ------------------------------------------------------------------------------------------- discovery


def discover_inputs(
    sources: str | Sequence[str],
    *,
    labels_from_dirs: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> Inputs:
    """Find every input image named by ``sources`` (directories, globs, manifests, image files).

    Paths are sorted within each directory or glob source and kept in order from manifests; a path named twice
    is kept once (first occurrence and its label). ``labels_from_dirs`` applies to directory and glob sources
    (the first directory level below the source's fixed part); manifests carry their own ``label`` column.
    Raises ``InputError`` for a source that is missing or unreadable, or when no input is found at all.
    """
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise InputError("no input given: pass directories, globs or manifest files")
    found: dict[str, str | None] = {}
    duplicates = 0
    for source in sources:
        for path, label in _discover_one(str(source), labels_from_dirs, filesystem):
            if path in found:
                duplicates += 1
            else:
                found[path] = label
    if not found:
        raise InputError(
            f"no input images found in {list(sources)} (directories are searched for {sorted(IMAGE_EXTENSIONS)})"
        )
    table = pa.table({"path": list(found), "label": list(found.values())}, schema=INPUT_SCHEMA)
    return Inputs(table, duplicates)


def _discover_one(
    source: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    fs, inner = resolve_location(source, filesystem)
    if has_glob(inner):
        return _from_glob(source, fs, inner, labels_from_dirs, filesystem)
    try:
        info = fs.get_file_info(inner)
    except OSError as e:
        raise InputError(f"{source}: cannot access: {e}") from e
    if info.type == pafs.FileType.Directory:
        return _from_directory(source, fs, inner, labels_from_dirs, filesystem)
    if info.type != pafs.FileType.File:
        raise InputError(f"{source}: no such file or directory")
    ext = posixpath.splitext(inner)[1].lower()
    if ext in MANIFEST_EXTENSIONS:
        return _from_manifest(source, fs, inner, filesystem)
    if ext in IMAGE_EXTENSIONS:
        return [(file_identity(source, fs, inner, filesystem), None)]
    raise InputError(
        f"{source}: not a directory, glob, manifest ({', '.join(sorted(MANIFEST_EXTENSIONS))}) or image file"
    )


def _from_directory(
    source: str, fs: pafs.FileSystem, base: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    base = base.rstrip("/")
    for info in list_files(source, fs, base):
        parts = relative_parts(base, info.path)
        # Hidden entries are never images here: .ipynb_checkpoints, macOS "._x.jpg" resource forks, ...
        if any(part.startswith(".") for part in parts) or f".{info.extension.lower()}" not in IMAGE_EXTENSIONS:
            continue
        label = parts[0] if labels_from_dirs and len(parts) > 1 else None
        yield file_identity(source, fs, info.path, filesystem), label


def _from_glob(
    source: str, fs: pafs.FileSystem, pattern: str, labels_from_dirs: bool, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    for path, parts in glob_files(source, fs, pattern):
        label = parts[0] if labels_from_dirs and len(parts) > 1 else None
        yield file_identity(source, fs, path, filesystem), label


def _from_manifest(
    source: str, fs: pafs.FileSystem, inner: str, filesystem: pafs.FileSystem | None
) -> Iterable[tuple[str, str | None]]:
    ext = posixpath.splitext(inner)[1].lower()
    try:
        if ext == ".parquet":
            with fs.open_input_file(inner) as f:
                table = pq.read_table(f)
        else:
            with fs.open_input_stream(inner) as stream:
                data = stream.read()
            if ext in (".txt", ".lst"):
                lines = (line.strip() for line in data.decode("utf-8").splitlines())
                paths = [line for line in lines if line and not line.startswith("#")]
                table = pa.table({"path": pa.array(paths, pa.string())})
            else:
                options = pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
                convert = pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()})
                table = pacsv.read_csv(io.BytesIO(data), parse_options=options, convert_options=convert)
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(f"{source}: cannot read manifest: {e}") from e
    if "path" not in table.column_names:
        raise InputError(f"{source}: a manifest needs a 'path' column, found {table.column_names}")
    paths = table.column("path").to_pylist()
    labels = (
        table.column("label").cast(pa.string()).to_pylist() if "label" in table.column_names else [None] * len(paths)
    )
    directory = posixpath.dirname(inner)
    for row, (path, label) in enumerate(zip(paths, labels, strict=True)):
        if not path:
            raise InputError(f"{source}: row {row} has an empty path")
        if is_uri(path) or filesystem is not None:
            yield path, label  # already names its filesystem, or lives in the one given
        elif os.path.isabs(path):
            yield os.path.normpath(path), label
        else:
            yield file_identity(source, fs, posixpath.normpath(posixpath.join(directory, path)), filesystem), label


# ------------------------------------------------------------------------------------------- the read


def preprocess_rows(batch: pa.Table, *, preprocessing: Preprocessing, filesystem: pafs.FileSystem | None) -> pa.Table:
    """Read, load and crop a batch of ``path, label`` rows.

    Adds ``width, height`` (original size), ``image`` and ``reason, error`` (see ``stages.preprocess_images``).
    """
    paths = batch.column("path").to_pylist()
    max_bytes = preprocessing.limits.max_bytes
    table = preprocess_images(len(paths), lambda i: read_bytes(paths[i], filesystem, max_bytes), preprocessing)
    return pa.table(
        {
            "path": batch.column("path"),
            "label": batch.column("label"),
            **dict(zip(table.column_names, table.columns, strict=True)),
        }
    )


@job_priority
def preprocess_block(block: pa.Table, *, inputs: list[ObjectRef], block_rows: int, **preprocess: Any) -> pa.Table:
    """``preprocess_rows`` of the input blocks numbered in ``block`` (``numbered_blocks``' column ``id``)."""
    import ray

    table = ray.get(inputs[0])  # nested in a list: Ray Data passes it through unresolved
    rows = pa.concat_tables([table.slice(i * block_rows, block_rows) for i in block.column("id").to_pylist()])
    return preprocess_rows(rows, **preprocess)
