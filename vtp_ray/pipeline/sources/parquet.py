"""Parquet files with image bytes: one read task per file, a row group at a time.

The image column holds bytes, or the Hugging Face hub's ``{"bytes", "path"}`` struct; the key, label and caption
columns are named by ``SampleOptions``. Without a key column the struct's ``path`` is the key. A parquet file with a
``path`` column and no image column is a manifest of loose files (``files``), not samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..priority import job_priority
from ..spec import PipelineSpec, Preprocessing, SampleOptions
from ..stages import block_rows, numbered_blocks
from .locations import InputError
from .samples import SampleSource, preprocess_samples

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = ["ParquetSource", "image_column", "parquet_source", "preprocess_parquet", "read_parquet_files"]

_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")


@dataclass(frozen=True)
class ParquetSource(SampleSource):
    """Parquet files with image bytes in ``image_column``."""

    kind = "parquet"
    image_column: str = "image"

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        """One task per file reads it a row group at a time, in blocks of ``stages.block_rows`` samples: Ray Data's
        own parquet reader (2.60) gathers small files into one read task and one block, which serializes the
        preprocessing and holds the model back until the whole read is done."""
        import sys

        import ray

        count = len(self.files)
        return numbered_blocks(count).map_batches(
            read_parquet_files,
            batch_format="pyarrow",
            batch_size=None,  # one file per task
            **spec.preprocess_tasks(
                cpus,
                fn_kwargs={
                    "files": list(zip(self.files, self.inner, strict=True)),
                    "filesystem": self.filesystem,
                    "columns": [self.image_column, *self._columns()],
                    "block_rows": block_rows(spec, sys.maxsize, cpus),  # streamed, never counted up front
                    "image_column": self.image_column,
                    "options": self.options,
                    "done": [ray.put(self.done)],
                    "preprocessing": spec.preprocessing,
                },
            ),
        )

    def first_keys(self, inner: str, n: int) -> list[str]:
        """From the key column alone (or the image struct's ``path``)."""
        parquet = pq.ParquetFile(inner, filesystem=self.filesystem)
        key = self.options.key
        column = key if key in parquet.schema_arrow.names else f"{self.image_column}.path"
        keys: list[str] = []
        for batch in parquet.iter_batches(batch_size=max(n, 64), columns=[column]):
            values = batch.column(0)
            values = values if key in batch.schema.names else pc.struct_field(values, "path")
            keys.extend(values.cast(pa.string()).to_pylist()[: n - len(keys)])
            if len(keys) >= n:
                break
        return keys

    def _columns(self) -> list[str]:
        """The key, label and caption columns the files have."""
        names = pq.read_schema(self.inner[0], filesystem=self.filesystem).names
        wanted = [self.options.key, self.options.label or "label", self.options.caption]
        return [c for c in dict.fromkeys(wanted) if c and c in names and c != self.image_column]


def image_column(fs: pafs.FileSystem, path: str, options: SampleOptions) -> str | None:
    """The image column of a parquet file (bytes or a ``{bytes, path}`` struct): the first of ``image_keys`` (when
    not the default) and ``image``, ``jpg``, ... present; None when it has none (a manifest)."""
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read the parquet schema: {e}") from e
    candidates = [options.image_keys[0]] if options.image_keys != SampleOptions.image_keys else []
    for name in [*candidates, *_IMAGE_COLUMNS]:
        if name in schema.names and _holds_bytes(schema.field(name).type):
            return name
    return None


def _holds_bytes(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return dtype.get_field_index("bytes") >= 0 and _holds_bytes(dtype.field("bytes").type)
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def parquet_source(found: list[tuple[str, str]], fs: pafs.FileSystem, options: SampleOptions) -> ParquetSource:
    """The ``ParquetSource`` of ``(identity, inner path)`` files: the image column (and the key) of the first file
    serve all of them. ``InputError`` when the samples have no key: no key column and no image struct path."""
    identity, inner = found[0]
    column = image_column(fs, inner, options)
    if column is None:
        raise InputError(f"{identity}: no image column in {list(_IMAGE_COLUMNS)}")
    schema = pq.read_schema(inner, filesystem=fs)
    dtype = schema.field(column).type
    if options.key not in schema.names and not (pa.types.is_struct(dtype) and dtype.get_field_index("path") >= 0):
        raise InputError(
            f"{identity}: no key column {options.key!r} (columns: {schema.names}) and no image path to use as the "
            "key: name the column with --key-column"
        )
    files = dict.fromkeys(found)  # a file named twice is read once
    return ParquetSource(
        files=tuple(i for i, _ in files), inner=tuple(p for _, p in files), filesystem=fs, options=options,
        image_column=column,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- the stage


@job_priority
def read_parquet_files(
    task: pa.Table,
    *,
    files: list[tuple[str, str]],
    filesystem: pafs.FileSystem,
    columns: list[str],
    block_rows: int,
    **preprocess: Any,
) -> Iterator[pa.Table]:
    """The preprocessed samples of the parquet files numbered in ``task`` (``numbered_blocks``' column ``id``;
    ``files`` holds ``(identity, inner path)``), in blocks of ``block_rows``: never a whole file in memory."""
    for i in task.column("id").to_pylist():
        identity, inner = files[i]
        with filesystem.open_input_file(inner) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=block_rows, columns=columns):
                yield preprocess_parquet(pa.Table.from_batches([batch]), file=identity, **preprocess)


def preprocess_parquet(
    batch: pa.Table,
    *,
    file: str,
    image_column: str,
    options: SampleOptions,
    done: list[ObjectRef],
    preprocessing: Preprocessing,
) -> pa.Table:
    """Parquet rows with image bytes, read from ``file`` (its identity) -> preprocessed rows."""
    images = batch.column(image_column)
    struct = pa.types.is_struct(images.type)
    data = (pc.struct_field(images, "bytes") if struct else images).to_pylist()
    if options.key in batch.column_names:
        keys = batch.column(options.key).cast(pa.string()).to_pylist()
    else:
        keys = pc.struct_field(images, "path").to_pylist()
    label = options.label or "label"
    labels = batch.column(label).cast(pa.string()).to_pylist() if label in batch.column_names else [None] * len(data)
    captions = (
        batch.column(options.caption).cast(pa.string()).to_pylist()
        if options.caption in batch.column_names
        else [None] * len(data)
    )
    problems = [None if d is not None else f"no image bytes in column {image_column!r}" for d in data]
    return preprocess_samples(
        [f"{file}#{key}" for key in keys],
        labels,
        f"{label} column",
        captions,
        data,
        problems,
        options=options,
        done=done,
        preprocessing=preprocessing,
    )
