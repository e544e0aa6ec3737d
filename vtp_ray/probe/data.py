"""The linear probe's data side: its two image sets, the training stream's plan, and the Ray Data reads (no torch).

An image set (``ProbeSet``) is a sequence of *units*, each holding a known number of samples: one image per unit
for image folders and manifests (``pipeline.inputs.discover_inputs``), one webdataset shard or parquet file per
unit for sample sources (``pipeline.samples.find_samples``; their samples are counted once, by a Ray task per
file), one parquet part of stored features per unit in the fast mode.

The training stream is upstream's ``InfiniteSampler`` over a ``RandomSampler``: pass after pass over the set, each
pass in a fresh random order (units permuted with a generator seeded by ``(seed, pass)``), cut into epochs of
``epoch_length x global batch`` samples. ``epoch_plan`` says which units (and which samples of them) epoch ``e``
holds, so an epoch's dataset is built, re-built after a failure, or resumed, without reading anything before it.
Image folders are thus shuffled image by image as upstream's are; shards and parquet files whole (the webdataset
convention), their samples then mixed by a shuffle buffer in each worker (``ProbeSettings.shuffle_buffer``).

Every read task decodes and transforms its images (``transforms``: random resized crop + flip for training, resize
+ center crop for validation) into rows ``path, target, image, reason, error`` (``image``: uint8 pixels as one
fixed-size binary value; null with a reason when the input cannot be used, which never stops the run). Features
rows are ``path, target, features``.
"""

from __future__ import annotations

import json
import math
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..images import ImageLimits, ImageLoadError, load_image
from ..pipeline.inputs import InputError, discover_inputs, read_bytes
from ..pipeline.samples import SampleSource, class_id, find_samples
from ..pipeline.spec import SampleOptions
from ..pipeline.stages import NoImage, Refused
from .settings import ProbeSettings
from .transforms import random_resized_crop, resize_center_crop

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = [
    "FEATURES",
    "ProbeSet",
    "Reader",
    "UnknownClass",
    "block_rows_for",
    "count_tar_samples",
    "epoch_dataset",
    "epoch_plan",
    "feature_set",
    "find_probe_sets",
    "read_task",
    "stream_slices",
    "validation_dataset",
]

#: The fast mode's stored feature column.
FEATURES = "features"
SetKind = Literal["files", "webdataset", "parquet", "features"]


class UnknownClass(Refused):
    """A validation image whose class the training set does not have."""

    reason = "unknown_class"


@dataclass(frozen=True)
class ProbeSet:
    """One side of a probe, ``train`` or ``val``: its units, the samples in each, how to read them.

    ``table`` (files): ``path, target`` (the class index, int32), one row per unit. ``samples``: the sample files.
    ``features``: the stored feature parts (local paths). ``excluded``: inputs left out before the run (no class,
    a class the training set lacks), each ``{path, reason, error}``.
    """

    name: str
    sources: tuple[str, ...]
    kind: SetKind
    sizes: np.ndarray
    table: pa.Table | None = None
    samples: SampleSource | None = None
    features: tuple[str, ...] = ()
    excluded: tuple[dict[str, str], ...] = ()

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def description(self) -> dict[str, Any]:
        return {"kind": self.kind, "units": len(self.sizes), "samples": self.total, "excluded": len(self.excluded)}


def find_probe_sets(
    train: Sequence[str],
    val: Sequence[str],
    options: SampleOptions,
    *,
    filesystem: pafs.FileSystem | None = None,
    num_classes: int | None = None,
    decode_cpus: float = 0.5,
) -> tuple[ProbeSet, ProbeSet, list[str]]:
    """``(train, val, class names)``.

    Image folders (label = first-level directory) and manifests (their ``label`` column): the classes are the
    training set's labels, sorted (ImageFolder's order); a validation label outside them is excluded
    (``unknown_class``), as is an input with no label (``no_class``). Sample sources (shards, parquet image bytes):
    the label is the sample's integer class index below ``num_classes`` (default 1000, ImageNet's); samples
    without one become error rows when read. Both sets must be of the same form. Counting the samples of shards
    starts Ray tasks.
    """
    train_samples = find_samples(train, options, filesystem)
    val_samples = find_samples(val, options, filesystem)
    if (train_samples is None) != (val_samples is None):
        raise InputError("--train and --val must both be image folders / manifests, or both shards / parquet files")
    if train_samples is not None:
        num_classes = num_classes or 1000  # ImageNet's shards: 0 .. 999
        counted = replace(options, class_ids=True, num_classes=num_classes)
        sets = []
        for name, sources, source in (("train", train, train_samples), ("val", val, val_samples)):
            source = replace(source, options=counted)
            sizes = _count_samples(source, decode_cpus)
            sets.append(ProbeSet(name, tuple(sources), source.kind, sizes, samples=source))
        return sets[0], sets[1], [str(i) for i in range(num_classes)]
    found_train = discover_inputs(train, labels_from_dirs=True, filesystem=filesystem)
    found_val = discover_inputs(val, labels_from_dirs=True, filesystem=filesystem)
    classes = sorted({label for label in found_train.table.column("label").to_pylist() if label is not None})
    if not classes:
        raise InputError(f"{list(train)}: no image is inside a class directory (or has a label in its manifest)")
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"the training set has {len(classes)} classes, not {num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    sets = []
    for name, sources, found in (("train", train, found_train), ("val", val, found_val)):
        paths = found.table.column("path").to_pylist()
        labels = found.table.column("label").to_pylist()
        keep, targets, excluded = [], [], []
        for path, label in zip(paths, labels, strict=True):
            if label is None:
                excluded.append({"path": path, "reason": "no_class", "error": "not inside a class directory"})
            elif label not in index:
                excluded.append(
                    {"path": path, "reason": UnknownClass.reason, "error": f"class {label!r} is not a training class"}
                )
            else:
                keep.append(path)
                targets.append(index[label])
        if not keep:
            raise InputError(f"{list(sources)}: no {name} image with a training class")
        table = pa.table({"path": pa.array(keep, pa.string()), "target": pa.array(targets, pa.int32())})
        sets.append(ProbeSet(name, tuple(sources), "files", np.ones(len(keep), np.int64), table=table,
                             excluded=tuple(excluded)))  # fmt: skip
    return sets[0], sets[1], classes


def feature_set(images: ProbeSet, parts: Sequence[str]) -> ProbeSet:
    """The stored features of a set's images (the fast mode): parquet parts with ``path, target, features``."""
    sizes = np.array([pq.ParquetFile(p).metadata.num_rows for p in parts], np.int64)
    return ProbeSet(images.name, images.sources, "features", sizes, features=tuple(parts), excluded=images.excluded)


# ------------------------------------------------------------------------------------------- the plan


def stream_slices(
    sizes: np.ndarray, first: int, count: int, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unit, start, stop)`` arrays: the slices of units holding samples ``first .. first + count - 1`` of a
    stream, in stream order.

    With ``seed``, the stream is the training stream: pass after pass over all units, pass ``p`` in the order of
    ``np.random.default_rng((seed, p)).permutation``. Without, it is one pass in the units' order (validation).
    """
    total = int(sizes.sum())
    if total <= 0:
        raise ValueError("the set holds no samples")
    end = first + count
    if seed is None and end > total:
        raise ValueError(f"samples {first} .. {end - 1} are past the set's {total}")
    units, starts, stops = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for p in range(first // total, (end - 1) // total + 1 if count else 0):
        order = np.arange(len(sizes)) if seed is None else np.random.default_rng((seed, p)).permutation(len(sizes))
        ends = np.cumsum(sizes[order])
        begins = ends - sizes[order]
        low, high = max(first - p * total, 0), min(end - p * total, total)
        chosen = (ends > low) & (begins < high)
        units.append(order[chosen])
        starts.append(np.maximum(low - begins[chosen], 0))
        stops.append(np.minimum(high - begins[chosen], sizes[order][chosen]))
    return np.concatenate(units), np.concatenate(starts), np.concatenate(stops)


def epoch_plan(sizes: np.ndarray, seed: int, epoch: int, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slices of epoch ``epoch`` of the training stream (``stream_slices``): its samples ``epoch x samples`` up
    to the next epoch's."""
    return stream_slices(sizes, epoch * samples, samples, seed)


# ------------------------------------------------------------------------------------------- reading


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


def _reader(probe_set: ProbeSet, settings: ProbeSettings, train: bool, stream: int, block_rows: int,
            limits: ImageLimits, filesystem: pafs.FileSystem | None, tag: str | None = None) -> Reader:  # fmt: skip
    files: tuple[tuple[str, str], ...] = ()
    options, image_column = SampleOptions(), None
    if probe_set.samples is not None:
        source = probe_set.samples
        files = tuple(zip(source.files, source.inner, strict=True))
        options, image_column, filesystem = source.options, source.image_column, source.filesystem
    elif probe_set.kind == "features":
        files = tuple((p, p) for p in probe_set.features)
    return Reader(
        kind=probe_set.kind,
        train=train,
        size=settings.size,
        resize_size=settings.resize_size,
        crop_scale=settings.crop_scale,
        crop_ratio=settings.crop_ratio,
        seed=settings.seed,
        stream=stream,
        limits=limits,
        block_rows=block_rows,
        filesystem=filesystem,
        options=options,
        image_column=image_column,
        files=files,
        tag=tag,
    )


def _tasks(
    probe_set: ProbeSet, units: np.ndarray, starts: np.ndarray, stops: np.ndarray, block_rows: int,
    positions: np.ndarray | None = None,
) -> list:  # fmt: skip
    """Read tasks: runs of up to ``block_rows`` single images (their rows of the input table, and their positions in
    the stream, which seed their augmentation), or one unit slice each (a whole shard or parquet file is read by one
    task, in blocks)."""
    if probe_set.kind == "files":
        positions = np.zeros(len(units), np.int64) if positions is None else positions
        return [(units[i : i + block_rows], positions[i : i + block_rows]) for i in range(0, len(units), block_rows)]
    return [(int(u), int(a), int(b)) for u, a, b in zip(units, starts, stops, strict=True)]


def _dataset(probe_set: ProbeSet, reader: Reader, tasks: list, decode_cpus: float) -> Dataset:
    import ray

    count = len(tasks)
    # One read task per entry, made lazily from task numbers (ray.data.from_items would run a task per block up
    # front); the task list and the input table go through the object store once.
    inputs = [ray.put(tasks), ray.put(probe_set.table)]
    return ray.data.range(count, override_num_blocks=count).map_batches(
        read_task,
        batch_format="pyarrow",
        batch_size=None,  # one task number per call
        fn_kwargs={"refs": inputs, "reader": reader},
        num_cpus=decode_cpus,
    )


def epoch_dataset(
    probe_set: ProbeSet,
    settings: ProbeSettings,
    epoch: int,
    rank: int,
    workers: int,
    *,
    block_rows: int,
    limits: ImageLimits,
    decode_cpus: float,
    filesystem: pafs.FileSystem | None = None,
) -> Dataset:
    """Worker ``rank``'s training rows of epoch ``epoch``: exactly ``epoch_length x batch_size`` samples (rows or
    error rows), augmented (``features``: as stored), in order.

    Image folders are dealt as ``DistributedSampler`` deals them: worker ``r`` takes every ``workers``-th image of
    the epoch from the ``r``-th on, so that each step's global batch is the stream's next ``batch x workers``
    images whatever the number of workers, each augmented with draws seeded by its position in the stream: ``W``
    workers train the heads as one worker with a ``W`` times larger batch would. Shards, parquet files and stored
    features are cut into ``workers`` consecutive parts instead (a shard is read from its start).
    """
    samples = settings.epoch_length * settings.global_batch(workers)
    first = epoch * samples
    if probe_set.kind == "files":
        units, _, _ = epoch_plan(probe_set.sizes, settings.seed, epoch, samples)
        positions = np.arange(first, first + samples)[rank::workers]
        units, starts, stops = units[rank::workers], None, None
    else:
        part = samples // workers
        units, starts, stops = stream_slices(probe_set.sizes, first + rank * part, part, settings.seed)
        positions = None
    reader = _reader(probe_set, settings, True, epoch * workers + rank, block_rows, limits, filesystem)
    return _dataset(probe_set, reader, _tasks(probe_set, units, starts, stops, block_rows, positions), decode_cpus)


def validation_dataset(
    probe_set: ProbeSet,
    settings: ProbeSettings,
    rank: int = 0,
    workers: int = 1,
    *,
    block_rows: int,
    limits: ImageLimits,
    decode_cpus: float,
    filesystem: pafs.FileSystem | None = None,
    tag: str | None = None,
) -> Dataset:
    """Worker ``rank``'s part of ``probe_set``: consecutive samples, about ``1 / workers`` of them, in order, resized
    and center-cropped (``features``: as stored); every sample is in one part. ``tag``: a ``split`` column with
    this value on every row."""
    total = probe_set.total
    first, end = total * rank // workers, total * (rank + 1) // workers
    units, starts, stops = stream_slices(probe_set.sizes, first, end - first)
    reader = _reader(probe_set, settings, False, 0, block_rows, limits, filesystem, tag)
    return _dataset(probe_set, reader, _tasks(probe_set, units, starts, stops, block_rows), decode_cpus)


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


def _count_samples(source: SampleSource, decode_cpus: float) -> np.ndarray:
    """Samples per file: parquet row counts from the footers, shard samples from the tar headers (a task each)."""
    import ray

    @ray.remote(num_cpus=decode_cpus)
    def count(kind: str, filesystem: pafs.FileSystem, inner: str) -> int:
        if kind == "parquet":
            return pq.ParquetFile(inner, filesystem=filesystem).metadata.num_rows
        return count_tar_samples(filesystem, inner)

    sizes = ray.get([count.remote(source.kind, source.filesystem, inner) for inner in source.inner])
    return np.array(sizes, np.int64)


#: Rows per read task at least: a task costs Ray Data tens of ms (and a new worker process while the pool grows),
#: decoding an image a few ms. 128 training images at 64 px took 3.8-7.4 s in blocks of 4, 0.2 s in blocks of 64.
MIN_BLOCK_ROWS = 64


def block_rows_for(samples: int, size: int, cpus: float, decode_cpus: float) -> int:
    """Rows per read task or block: about 32 MB of pixels, at least 4 tasks per decode slot when the set is large
    enough, and never fewer than ``MIN_BLOCK_ROWS`` (the workers re-batch them)."""
    slots = max(1, int(cpus / decode_cpus))
    rows = min((32 * 2**20) // (3 * size * size), math.ceil(samples / (4 * slots)))
    return max(1, min(max(rows, MIN_BLOCK_ROWS), samples))
