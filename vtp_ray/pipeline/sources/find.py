"""Which source a job's inputs name: the sample files of one format (tar shards, parquet files with image bytes), or
loose image files (directories, globs, manifests)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.fs as pafs

from ..spec import PipelineSpec, SampleOptions
from .files import Inputs, discover_inputs
from .locations import InputError, file_identity, glob_files, has_glob, list_files, resolve_location
from .parquet import image_column, parquet_source
from .samples import SampleSource
from .webdataset import ShardSource, is_shard

__all__ = ["find_samples", "find_source"]

#: (kind, identity, path inside the filesystem, filesystem) of one file; kind None: not a sample file.
_Found = tuple[str | None, str, str, pafs.FileSystem]


def find_source(inputs: str | Sequence[str], spec: PipelineSpec) -> Inputs | SampleSource:
    """What a job reads: the sample files named by ``inputs`` (``find_samples``), else the loose image files
    (``files.discover_inputs``, labelled by their first directory level with ``spec.labels_from_dirs``)."""
    samples = find_samples(inputs, spec.samples, spec.filesystem)
    if samples is not None:
        return samples
    return discover_inputs(inputs, labels_from_dirs=spec.labels_from_dirs, filesystem=spec.filesystem)


def find_samples(
    sources: str | Sequence[str], options: SampleOptions, filesystem: pafs.FileSystem | None = None
) -> SampleSource | None:
    """The sample files named by ``sources``, or None when they name loose images / manifests (``discover_inputs``).

    A source is a sample source when it is a tar shard, a parquet file with an image column (a parquet file
    with a ``path`` column and no image column is a manifest), or a directory / glob holding such files. All
    sources of a run must be of one kind. Raises ``InputError`` for mixtures and for unusable parquet schemas.
    """
    if isinstance(sources, str):
        sources = [sources]
    found: list[_Found] = []
    for source in sources:
        found.extend(_classify(str(source), options, filesystem))
    kinds = {kind for kind, *_ in found}
    if kinds == {None} or not found:
        return None
    if len(kinds) > 1:
        raise InputError(
            f"{list(sources)} mix {' and '.join(sorted(str(k or 'loose images') for k in kinds))}: "
            "tokenize one kind of input per run"
        )
    if len({fs.type_name for *_, fs in found}) > 1:
        raise InputError(f"{list(sources)}: sample files on different filesystems cannot be read in one run")
    fs = found[0][3]
    if kinds == {"parquet"}:
        return parquet_source([(identity, inner) for _, identity, inner, _ in found], fs, options)
    files = dict.fromkeys((identity, inner) for _, identity, inner, _ in found)  # a file named twice is read once
    return ShardSource(tuple(i for i, _ in files), tuple(p for _, p in files), fs, options)


def _classify(source: str, options: SampleOptions, filesystem: pafs.FileSystem | None) -> list[_Found]:
    """The sample files of ``source`` (kind None: not samples)."""
    fs, inner = resolve_location(source, filesystem)

    def of(kind: str, paths: list[str]) -> list[_Found]:
        return [(kind, file_identity(source, fs, path, filesystem), path, fs) for path in paths]

    if has_glob(inner):
        matches = [path for path, _ in glob_files(source, fs, inner)]
        if matches and all(is_shard(m) for m in matches):
            return of("webdataset", matches)
        if matches and all(m.lower().endswith(".parquet") for m in matches) and image_column(fs, matches[0], options):
            return of("parquet", matches)
        return [(None, source, inner, fs)]
    try:
        info = fs.get_file_info(inner)
    except OSError as e:
        raise InputError(f"{source}: cannot access: {e}") from e
    if info.type == pafs.FileType.File:
        if is_shard(inner):
            return of("webdataset", [inner])
        if inner.lower().endswith(".parquet") and image_column(fs, inner, options):
            return of("parquet", [inner])
        return [(None, source, inner, fs)]
    if info.type != pafs.FileType.Directory:
        return [(None, source, inner, fs)]  # discover_inputs reports it
    listing = [i.path for i in list_files(source, fs, inner.rstrip("/")) if not i.base_name.startswith(".")]
    shards = [path for path in listing if is_shard(path)]
    if shards:  # img2dataset's sidecar .parquet / _stats.json files are not shards
        return of("webdataset", shards)
    parquets = [path for path in listing if path.lower().endswith(".parquet")]
    if parquets and image_column(fs, parquets[0], options):
        return of("parquet", parquets)
    return [(None, source, inner, fs)]
