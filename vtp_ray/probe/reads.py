"""The probe's read tasks (no torch): a task number -> rows of decoded, transformed images (or stored features).

A ``Reader`` (the set's form, the transform, the limits) goes to every task; each task reads its entry of the task
list ``data`` planned: a run of single images (rows of the input table, and their positions in the stream), or a
slice of one shard / parquet file / features part. Rows are ``path, target, image, reason, error`` (``image``: the
uint8 pixels as one fixed-size binary value, null with the reason when the input cannot be used: it never stops
the run) or, for stored features, ``path, target, features``. Shards are read member by member (grouped by key, as
``read_webdataset`` groups them), skipping the samples before the slice by their headers; parquet files only the
row groups that hold the slice.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..images import ImageLimits, ImageLoadError, load_image
from ..pipeline.sources import class_id
from ..pipeline.sources.locations import read_bytes
from ..pipeline.spec import SampleOptions
from ..pipeline.stages import NoImage, Refused
from .transforms import random_resized_crop, resize_center_crop

if TYPE_CHECKING:
    from ray import ObjectRef

__all__ = ["FEATURES", "Reader", "SetKind", "count_tar_samples", "read_task"]

#: The fast mode's stored feature column.
FEATURES = "features"
SetKind = Literal["files", "webdataset", "parquet", "features"]


@dataclass(frozen=True)
class Reader:
    """What a read task needs: the set's form, the transform, and the limits (shipped to every task)."""

    kind: SetKind
    train: bool
    size: int
    resize_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    seed: int
    stream: int  # numbers the augmentation draws: one stream per (epoch, worker)
    limits: ImageLimits
    block_rows: int
    filesystem: pafs.FileSystem | None = None
    options: SampleOptions = field(default_factory=SampleOptions)
    image_column: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # sample / feature files: (identity, inner path)
    tag: str | None = None  # a constant "split" column for every row (the fast mode's extraction of both sets)

    def transform(self, img: Any, rng: np.random.Generator) -> np.ndarray:
        if self.train:
            return random_resized_crop(img, self.size, rng, self.crop_scale, self.crop_ratio)
        return resize_center_crop(img, self.resize_size, self.size)


def read_task(batch: pa.Table, *, refs: list[ObjectRef], reader: Reader) -> Iterator[pa.Table]:
    """The rows of the read tasks numbered in ``batch`` (a ``ray.data.range`` column ``id``), in blocks."""
    for block in _read_blocks(batch, refs, reader):
        yield block if reader.tag is None else block.append_column("split", pa.repeat(reader.tag, block.num_rows))


def _read_blocks(batch: pa.Table, refs: list[ObjectRef], reader: Reader) -> Iterator[pa.Table]:
    import ray

    tasks, table = ray.get(refs[0]), ray.get(refs[1])  # nested in a list: Ray Data passes them through unresolved
    for task_id in batch.column("id").to_pylist():
        task = tasks[task_id]
        rng = np.random.default_rng((reader.seed, reader.stream, task_id, 1))  # 1: the augmentation's draws
        if reader.kind == "files":
            units, positions = task
            yield _read_files(table.take(pa.array(units, pa.int64())), positions, reader)
        elif reader.kind == "webdataset":
            yield from _read_tar(task, reader, rng)
        elif reader.kind == "parquet":
            yield from _read_parquet(task, reader, rng)
        else:
            yield from _read_features(task, reader)


def _read_files(rows: pa.Table, positions: np.ndarray, reader: Reader) -> pa.Table:
    paths = rows.column("path").to_pylist()

    def fetch(i: int) -> bytes:
        return read_bytes(paths[i], reader.filesystem, reader.limits.max_bytes)

    # One generator per image, seeded by its place in the stream (~20 us): its crop does not depend on which
    # worker or task reads it.
    rngs = [np.random.default_rng((reader.seed, int(p), 2)) for p in positions]
    return _rows(paths, rows.column("target").to_pylist(), fetch, reader, rngs)


def _rows(
    paths: list[str],
    targets: list[int | None],
    fetch: Any,
    reader: Reader,
    rng: np.random.Generator | list[np.random.Generator],
) -> pa.Table:
    """Load and transform ``fetch(0) .. fetch(n - 1)``: one row each, a null image and its reason on failure.
    ``rng``: the augmentation's draws, one generator for all or one per image."""
    n, side = len(paths), reader.size
    pixels = np.zeros((n, side, side, 3), np.uint8)
    ok = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    messages: list[str | None] = [None] * n
    for i in range(n):
        try:
            if targets[i] is None:
                raise Refused("no class")
            pixels[i] = reader.transform(load_image(fetch(i), reader.limits), rng[i] if isinstance(rng, list) else rng)
            ok[i] = True
        except Refused as e:
            reasons[i], messages[i] = e.reason, str(e)
        except ImageLoadError as e:
            reasons[i], messages[i] = e.reason, str(e)
        except OSError as e:
            reasons[i], messages[i] = "unreadable", f"cannot read the file: {e}"
        except MemoryError:
            raise
        except Exception as e:
            reasons[i], messages[i] = "unexpected", f"{type(e).__name__}: {e}"
    validity = None if ok.all() else pa.array(ok).buffers()[1]
    images = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(side * side * 3), n, [validity, pa.py_buffer(pixels)], null_count=int(n - ok.sum())
    )
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "target": pa.array([t if k else None for t, k in zip(targets, ok, strict=True)], pa.int32()),
            "image": images,
            "reason": pa.array(reasons, pa.string()),
            "error": pa.array(messages, pa.string()),
        }
    )


def _labelled(
    paths: list[str], labels: list[str | None], name: str, reader: Reader
) -> tuple[list[int | None], dict[int, Refused]]:
    targets: list[int | None] = []
    refused: dict[int, Refused] = {}
    for i, label in enumerate(labels):
        try:
            targets.append(class_id(label, reader.options, name))
        except Refused as e:
            targets.append(-1)
            refused[i] = e
    return targets, refused


def _sample_rows(
    file: str, keys: list[str], data: list[bytes | None], labels: list[str | None], name: str, reader: Reader,
    rng: np.random.Generator,
) -> pa.Table:  # fmt: skip
    paths = [f"{file}#{key}" for key in keys]
    targets, refused = _labelled(paths, labels, name, reader)

    def fetch(i: int) -> bytes:
        if data[i] is None:
            raise NoImage(f"no image in {file}")
        if i in refused:
            raise refused[i]
        return data[i]

    return _rows(paths, targets, fetch, reader, rng)


def _read_tar(task: tuple[int, int, int], reader: Reader, rng: np.random.Generator) -> Iterator[pa.Table]:
    """Samples ``start .. stop - 1`` of one shard (members grouped by key, as ``read_webdataset`` does)."""
    unit, start, stop = task
    identity, inner = reader.files[unit]
    label_key = reader.options.label or "cls"
    keys: list[str] = []
    data: list[bytes | None] = []
    labels: list[str | None] = []
    for key, members in _tar_samples(reader.filesystem, inner, start, stop):
        keys.append(key)
        data.append(next((members[k] for k in reader.options.image_keys if k in members), None))
        labels.append(_member_text(members, label_key))
        if len(keys) == reader.block_rows:
            yield _sample_rows(identity, keys, data, labels, f"{label_key} member", reader, rng)
            keys, data, labels = [], [], []
    if keys:
        yield _sample_rows(identity, keys, data, labels, f"{label_key} member", reader, rng)


def _tar_samples(
    filesystem: pafs.FileSystem, inner: str, start: int, stop: int
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of samples ``start .. stop - 1``: the members before are skipped by their
    headers (seeking over their data where the file allows)."""
    index, key, members = -1, None, {}
    with filesystem.open_input_file(inner) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            directory, base = posixpath.split(member.name)
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            name = posixpath.join(directory, stem)
            if name != key:
                if key is not None and start <= index < stop:
                    yield key, members
                index, key, members = index + 1, name, {}
                if index >= stop:
                    return
            if start <= index:
                members[extension] = tar.extractfile(member).read()
        if key is not None and start <= index < stop:
            yield key, members


def count_tar_samples(filesystem: pafs.FileSystem, inner: str) -> int:
    """The samples (member groups) in one shard, from its headers."""
    return sum(1 for _ in _tar_keys(filesystem, inner))


def _tar_keys(filesystem: pafs.FileSystem, inner: str) -> Iterator[str]:
    key = None
    with filesystem.open_input_file(inner) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            directory, base = posixpath.split(member.name)
            stem, dot, _ = base.partition(".")
            if member.isreg() and dot and (name := posixpath.join(directory, stem)) != key:
                key = name
                yield name


def _member_text(members: dict[str, bytes], key: str) -> str | None:
    if key.startswith("json:"):
        try:
            value = json.loads(members.get("json", b"null") or b"null")
            value = value.get(key[5:]) if isinstance(value, dict) else None
        except ValueError:
            return None
        return None if value is None else str(value)
    raw = members.get(key)
    return raw.decode("utf-8", "replace").strip() if raw is not None else None


def _parquet_batches(
    filesystem: pafs.FileSystem, inner: str, start: int, stop: int, columns: list[str], rows: int
) -> Iterator[pa.Table]:
    """Rows ``start .. stop - 1`` of a parquet file, in tables of at most ``rows``: only the row groups that hold
    them are read."""
    with filesystem.open_input_file(inner) as f:
        parquet = pq.ParquetFile(f)
        metadata = parquet.metadata
        offsets = np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
        groups = [i for i in range(metadata.num_row_groups) if offsets[i + 1] > start and offsets[i] < stop]
        if not groups:
            return
        position = int(offsets[groups[0]])
        for batch in parquet.iter_batches(batch_size=rows, row_groups=groups, columns=columns):
            low, high = max(start - position, 0), min(stop - position, batch.num_rows)
            if high > low:
                yield pa.Table.from_batches([batch]).slice(low, high - low)
            position += batch.num_rows


def _read_parquet(task: tuple[int, int, int], reader: Reader, rng: np.random.Generator) -> Iterator[pa.Table]:
    unit, start, stop = task
    identity, inner = reader.files[unit]
    filesystem = reader.filesystem or pafs.LocalFileSystem()
    names = pq.read_schema(inner, filesystem=filesystem).names
    label = reader.options.label or "label"
    key = reader.options.key
    columns = [c for c in dict.fromkeys([reader.image_column, key, label]) if c in names]
    for table in _parquet_batches(filesystem, inner, start, stop, columns, reader.block_rows):
        images = table.column(reader.image_column)
        struct = pa.types.is_struct(images.type)
        data = (pc.struct_field(images, "bytes") if struct else images).to_pylist()
        keys = (table.column(key) if key in names else pc.struct_field(images, "path")).cast(pa.string()).to_pylist()
        labels = table.column(label).cast(pa.string()).to_pylist() if label in names else [None] * len(data)
        yield _sample_rows(identity, keys, data, labels, f"{label} column", reader, rng)


def _read_features(task: tuple[int, int, int], reader: Reader) -> Iterator[pa.Table]:
    unit, start, stop = task
    _, inner = reader.files[unit]
    columns = ["path", "target", FEATURES]
    yield from _parquet_batches(pafs.LocalFileSystem(), inner, start, stop, columns, reader.block_rows)
