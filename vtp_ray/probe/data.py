"""The linear probe's data side: its two image sets, the training stream's plan, and its datasets (no torch).

An image set (``ProbeSet``) is a sequence of *units*, each holding a known number of samples: one image per unit
for image folders and manifests (``pipeline.sources.discover_inputs``), one webdataset shard or parquet file per
unit for sample sources (``pipeline.sources.find_samples``; their samples are counted once, by a Ray task per
file), one parquet part of stored features per unit in the fast mode.

The training stream is upstream's ``InfiniteSampler`` over a ``RandomSampler``: pass after pass over the set, each
pass in a fresh random order (units permuted with a generator seeded by ``(seed, pass)``), cut into epochs of
``epoch_length x global batch`` samples. ``epoch_plan`` says which units (and which samples of them) epoch ``e``
holds, so an epoch's dataset is built, re-built after a failure, or resumed, without reading anything before it.
Image folders are thus shuffled image by image as upstream's are; shards and parquet files whole (the webdataset
convention), their samples then mixed by a shuffle buffer in each worker (``ProbeSettings.shuffle_buffer``).

A dataset is a list of read tasks (``reads.read_task``: decode and transform, random resized crop + flip for
training, resize + center crop for validation), one Ray Data task each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..images import ImageLimits
from ..pipeline.sources import InputError, SampleSource, discover_inputs, find_samples
from ..pipeline.spec import SampleOptions
from ..pipeline.stages import Refused
from .reads import FEATURES, Reader, SetKind, count_tar_samples, read_task
from .settings import ProbeSettings

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "FEATURES",
    "MIN_BLOCK_ROWS",
    "ProbeSet",
    "UnknownClass",
    "block_rows_for",
    "epoch_dataset",
    "epoch_plan",
    "feature_set",
    "find_probe_sets",
    "stream_slices",
    "validation_dataset",
]


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
    preprocess_cpus: float = 0.5,
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
            sizes = _count_samples(source, preprocess_cpus)
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


# ------------------------------------------------------------------------------------------- datasets


def _reader(probe_set: ProbeSet, settings: ProbeSettings, train: bool, stream: int, block_rows: int,
            limits: ImageLimits, filesystem: pafs.FileSystem | None, tag: str | None = None) -> Reader:  # fmt: skip
    files: tuple[tuple[str, str], ...] = ()
    options, image_column = SampleOptions(), None
    if probe_set.samples is not None:
        source = probe_set.samples
        files = tuple(zip(source.files, source.inner, strict=True))
        options, image_column, filesystem = source.options, getattr(source, "image_column", None), source.filesystem
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


def _dataset(probe_set: ProbeSet, reader: Reader, tasks: list, preprocess_cpus: float) -> Dataset:
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
        num_cpus=preprocess_cpus,
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
    preprocess_cpus: float,
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
    return _dataset(probe_set, reader, _tasks(probe_set, units, starts, stops, block_rows, positions), preprocess_cpus)


def validation_dataset(
    probe_set: ProbeSet,
    settings: ProbeSettings,
    rank: int = 0,
    workers: int = 1,
    *,
    block_rows: int,
    limits: ImageLimits,
    preprocess_cpus: float,
    filesystem: pafs.FileSystem | None = None,
    tag: str | None = None,
    shuffled: bool = False,
) -> Dataset:
    """Worker ``rank``'s part of ``probe_set``: consecutive samples, about ``1 / workers`` of them, in order, resized
    and center-cropped (``features``: as stored); every sample is in one part. ``tag``: a ``split`` column with
    this value on every row. ``shuffled``: in the order of the training stream's first pass instead (the fast mode
    stores the training features so: parts of one class each would make batches of one class)."""
    total = probe_set.total
    first, end = total * rank // workers, total * (rank + 1) // workers
    units, starts, stops = stream_slices(probe_set.sizes, first, end - first, settings.seed if shuffled else None)
    reader = _reader(probe_set, settings, False, 0, block_rows, limits, filesystem, tag)
    return _dataset(probe_set, reader, _tasks(probe_set, units, starts, stops, block_rows), preprocess_cpus)


def _count_samples(source: SampleSource, preprocess_cpus: float) -> np.ndarray:
    """Samples per file: parquet row counts from the footers, shard samples from the tar headers (a task each)."""
    import ray

    @ray.remote(num_cpus=preprocess_cpus)
    def count(kind: str, filesystem: pafs.FileSystem, inner: str) -> int:
        if kind == "parquet":
            return pq.ParquetFile(inner, filesystem=filesystem).metadata.num_rows
        return count_tar_samples(filesystem, inner)

    sizes = ray.get([count.remote(source.kind, source.filesystem, inner) for inner in source.inner])
    return np.array(sizes, np.int64)


#: Rows per read task at least: a task costs Ray Data tens of ms (and a new worker process while the pool grows),
#: decoding an image a few ms. 128 training images at 64 px took 3.8-7.4 s in blocks of 4, 0.2 s in blocks of 64.
MIN_BLOCK_ROWS = 64


def block_rows_for(samples: int, size: int, cpus: float, preprocess_cpus: float) -> int:
    """Rows per read task or block: about 32 MB of pixels, at least 4 tasks per decode slot when the set is large
    enough, and never fewer than ``MIN_BLOCK_ROWS`` (the workers re-batch them)."""
    slots = max(1, int(cpus / preprocess_cpus))
    rows = min((32 * 2**20) // (3 * size * size), math.ceil(samples / (4 * slots)))
    return max(1, min(max(rows, MIN_BLOCK_ROWS), samples))
