"""Datasets whose images live inside larger files: webdataset tar shards and parquet files with image bytes.

These are what ``img2dataset`` writes for LAION / DataComp / CC12M and what the Hugging Face hub serves. They are
read streaming, one read task per file (shards by Ray Data's ``read_webdataset``, parquet files by
``read_parquet_files``, a row group at a time: see ``SampleSource.preprocessed``), and every sample becomes one
row whose identity (the ``path`` column everywhere: output rows, error rows, resuming) is ``<file>#<key>``:
``/data/shards/00000.tar#000000042`` or ``s3://bucket/laion/00000.parquet#000000042``.

- webdataset: members are grouped by key (the name up to its first dot); the image is the first member present
  among ``image_keys`` (``jpg``, ``jpeg``, ``png``, ``webp``); the label is the ``cls`` member (or ``json:FIELD``),
  the caption (when asked) the ``txt`` member. Members are never decoded by Ray Data (no pickle, no unbounded
  image decode): image bytes go through ``images.preprocess_with_info`` with the run's limits, here. Sidecar
  files next to the shards (img2dataset's ``.parquet`` and ``_stats.json``) are not shards and are skipped.
- parquet: the image column holds bytes, or the hub's ``{"bytes", "path"}`` struct; the key, label and caption
  columns are named by ``SampleOptions``. Without a key column the struct's ``path`` is the key.

A sample that cannot become an image (no image member, broken bytes, over a limit) is an error row: rows + errors
always equal the samples read. Jobs that need classes (zero-shot, lightningdit) set ``SampleOptions.class_ids``:
the label is then the sample's integer class index, and a sample without a valid one is an error row too.
Samples are streamed, never listed up front: outputs are ordered by ``sample_sort_key`` (file, then key), and
``SampleSource.first_samples`` names the first few cheaply (``eval --save-images``). This module never imports
torch: its stage runs in Ray Data's read tasks.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .inputs import _GLOB_CHARS, InputError, _from_glob, _identity, _list_files, resolve_location
from .spec import PipelineSpec, Preprocessing, SampleOptions
from .stages import NoImage, Refused, preprocess_images

if TYPE_CHECKING:
    import pandas as pd
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = [
    "SHARD_EXTENSIONS",
    "BadLabel",
    "NoLabel",
    "SampleOptions",
    "SampleSource",
    "class_id",
    "find_samples",
    "preprocess_parquet",
    "preprocess_tar",
    "read_parquet_files",
    "sample_sort_key",
    "source_of",
]

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
SampleKind = Literal["webdataset", "parquet"]
#: A tar member's sample key and extension, as ``read_webdataset`` splits them (the key ends at the first dot of the
#: base name).
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class SampleSource:
    """Sample files of one kind: their identities (as recorded in ``path``), where they live, how to read them."""

    kind: SampleKind
    files: tuple[str, ...]  # identities: absolute paths or URIs
    inner: tuple[str, ...]  # the same files as paths inside ``filesystem``
    filesystem: pafs.FileSystem
    options: SampleOptions = field(default_factory=SampleOptions)
    image_column: str | None = None  # parquet: the resolved image column
    done: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # identities a run skips

    def description(self) -> dict[str, Any]:
        """What a run's report says of its source: ``{"kind", "files"}``."""
        return {"kind": self.kind, "files": len(self.files)}

    def skipped(self) -> int:
        """How many of ``done`` belong to these files (the samples a resumed run does not read again)."""
        return len(self.done) and int(pc.sum(pc.is_in(_file_of(self.done), value_set=pa.array(self.files))).as_py())

    def preprocessed(self, spec: PipelineSpec, block_rows: int) -> Dataset:
        """The Ray Data read of these files and the preprocess stage: rows as ``stages.preprocess_rows`` makes.

        Parquet files are read a row group at a time by one task per file, in blocks of ``block_rows`` samples:
        Ray Data's own parquet reader (2.60) gathers small files into one read task and one block, which
        serializes decoding and holds the model back until the whole read is done.
        """
        import ray

        common = {
            "options": self.options,
            "done": [ray.put(self.done)],
            "preprocessing": spec.preprocessing,
        }
        if self.kind == "webdataset":
            # decoder=None: members stay bytes; nothing is unpickled or decoded without limits by Ray Data.
            read = ray.data.read_webdataset(
                list(self.inner),
                filesystem=self.filesystem,
                decoder=None,
                file_extensions=None,
                num_cpus=spec.preprocess_cpus,
                # One read task per shard, as planned: a higher parallelism would split each read's blocks, which
                # stops Ray Data from fusing the decoding into the read (the raw bytes would cross the object store).
                override_num_blocks=len(self.inner),
            )
            ids = dict(zip(self.inner, self.files, strict=True))
            return read.map_batches(
                preprocess_tar,
                batch_format="pandas",
                batch_size=None,
                fn_kwargs={**common, "ids": ids},
                num_cpus=spec.preprocess_cpus,
            )
        count = len(self.files)
        return ray.data.range(count, override_num_blocks=count).map_batches(
            read_parquet_files,
            batch_format="pyarrow",
            batch_size=None,  # one file per task
            fn_kwargs={
                **common,
                "files": list(zip(self.files, self.inner, strict=True)),
                "filesystem": self.filesystem,
                "columns": [self.image_column, *self._parquet_columns()],
                "image_column": self.image_column,
                "block_rows": block_rows,
            },
            num_cpus=spec.preprocess_cpus,
        )

    def first_samples(self, n: int) -> list[str]:
        """The identities of the first ``n`` samples in file order, read cheaply: for tar shards the member headers
        (streaming; only samples with an image member count), for parquet the key column alone."""
        found: list[str] = []
        for identity, inner in zip(self.files, self.inner, strict=True):
            if len(found) >= n:
                break
            wanted = n - len(found)
            keys = self._first_tar_keys(inner, wanted) if self.kind == "webdataset" else self._first_keys(inner, wanted)
            found.extend(f"{identity}#{key}" for key in keys)
        return found

    def _first_tar_keys(self, inner: str, n: int) -> list[str]:
        keys: dict[str, None] = {}
        with self.filesystem.open_input_stream(inner) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isreg() else None
                if match and match.group(2) in self.options.image_keys:
                    keys[match.group(1)] = None
                    if len(keys) >= n:
                        break
        return list(keys)

    def _first_keys(self, inner: str, n: int) -> list[str]:
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

    def _parquet_columns(self) -> list[str]:
        names = pq.read_schema(self.inner[0], filesystem=self.filesystem).names
        wanted = [self.options.key, self.options.label or "label", self.options.caption]
        return [c for c in dict.fromkeys(wanted) if c and c in names and c != self.image_column]


# ------------------------------------------------------------------------------------------- discovery


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
    found: list[tuple[SampleKind | None, str, str, pafs.FileSystem]] = []
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
    (kind,) = kinds
    if len({fs.type_name for *_, fs in found}) > 1:
        raise InputError(f"{list(sources)}: sample files on different filesystems cannot be read in one run")
    files = dict.fromkeys((identity, inner) for _, identity, inner, _ in found)  # a file named twice is read once
    return SampleSource(
        kind,
        tuple(i for i, _ in files),
        tuple(p for _, p in files),
        found[0][3],
        options,
        _image_column(kind, found, options),
    )


def source_of(path: str) -> str:
    """The file part of a sample identity (``<file>#<key>`` -> ``<file>``); a plain path is its own source."""
    file = _file_of(pa.array([path], pa.string()))[0].as_py()
    return file or path


def sample_sort_key(path: str) -> tuple[str, str]:
    """The order of sample identities in outputs: by file, then by key (a plain path sorts as its own file)."""
    file = source_of(path)
    return file, path[len(file) + 1 :]


def _file_of(paths: pa.Array) -> pa.Array:
    pattern = r"^(?P<file>.*?\.(?:tar|tar\.gz|tgz|parquet))#"
    return pc.struct_field(pc.extract_regex(paths, pattern), [0])


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


def _classify(
    source: str, options: SampleOptions, filesystem: pafs.FileSystem | None
) -> list[tuple[SampleKind | None, str, str, pafs.FileSystem]]:
    """``(kind, identity, inner path, filesystem)`` of the sample files of ``source`` (kind None: not samples)."""
    fs, inner = resolve_location(source, filesystem)
    if _GLOB_CHARS.search(inner):
        matches = [
            resolve_location(identity, filesystem)[1]
            for identity, _ in _from_glob(source, fs, inner, False, filesystem)
        ]
        if matches and all(_is_shard(m) for m in matches):
            return [("webdataset", _identity(source, fs, m, filesystem), m, fs) for m in matches]
        if (
            matches
            and all(m.lower().endswith(".parquet") for m in matches)
            and _parquet_images(fs, matches[0], options)
        ):
            return [("parquet", _identity(source, fs, m, filesystem), m, fs) for m in matches]
        return [(None, source, inner, fs)]
    try:
        info = fs.get_file_info(inner)
    except OSError as e:
        raise InputError(f"{source}: cannot access: {e}") from e
    if info.type == pafs.FileType.File:
        if _is_shard(inner):
            return [("webdataset", _identity(source, fs, inner, filesystem), inner, fs)]
        if inner.lower().endswith(".parquet") and _parquet_images(fs, inner, options):
            return [("parquet", _identity(source, fs, inner, filesystem), inner, fs)]
        return [(None, source, inner, fs)]
    if info.type != pafs.FileType.Directory:
        return [(None, source, inner, fs)]  # discover_inputs reports it
    listing = [i for i in _list_files(source, fs, inner.rstrip("/")) if not i.base_name.startswith(".")]
    shards = [i for i in listing if _is_shard(i.path)]
    if shards:  # img2dataset's sidecar .parquet / _stats.json files are not shards
        return [("webdataset", _identity(source, fs, i.path, filesystem), i.path, fs) for i in shards]
    parquets = [i for i in listing if i.path.lower().endswith(".parquet")]
    if parquets and _parquet_images(fs, parquets[0].path, options):
        return [("parquet", _identity(source, fs, i.path, filesystem), i.path, fs) for i in parquets]
    return [(None, source, inner, fs)]


def _parquet_images(fs: pafs.FileSystem, path: str, options: SampleOptions) -> str | None:
    """The image column of a parquet file (bytes or a ``{bytes, path}`` struct), or None (a manifest)."""
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path}: cannot read the parquet schema: {e}") from e
    candidates = [options.image_keys[0]] if options.image_keys != SampleOptions.image_keys else []
    for name in [*candidates, *_PARQUET_IMAGE_COLUMNS]:
        if name in schema.names and _holds_bytes(schema.field(name).type):
            return name
    return None


def _holds_bytes(dtype: pa.DataType) -> bool:
    if pa.types.is_struct(dtype):
        return dtype.get_field_index("bytes") >= 0 and _holds_bytes(dtype.field("bytes").type)
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def _image_column(
    kind: SampleKind, found: list[tuple[Any, str, str, pafs.FileSystem]], options: SampleOptions
) -> str | None:
    if kind != "parquet":
        return None
    _, identity, inner, fs = found[0]
    column = _parquet_images(fs, inner, options)
    schema = pq.read_schema(inner, filesystem=fs)
    struct_path = pa.types.is_struct(schema.field(column).type) and schema.field(column).type.get_field_index("path")
    if options.key not in schema.names and not (struct_path is not False and struct_path >= 0):
        raise InputError(
            f"{identity}: no key column {options.key!r} (columns: {schema.names}) and no image path to use as the "
            "key: name the column with --key-column"
        )
    return column


# ------------------------------------------------------------------------------------------- the stage


def preprocess_tar(
    batch: pd.DataFrame,
    *,
    ids: dict[str, str],
    options: SampleOptions,
    done: list[ObjectRef],
    preprocessing: Preprocessing,
) -> pa.Table:
    """Webdataset samples (``read_webdataset`` rows, undecoded) -> preprocessed rows, errors as rows."""
    keys = [str(k) for k in batch["__key__"]]
    shards = [ids.get(url, url) for url in batch["__url__"]]
    records = batch.to_dict("records")
    data, labels, captions, problems = [], [], [], []
    for record in records:
        image = next((record[k] for k in options.image_keys if isinstance(record.get(k), bytes)), None)
        data.append(image)
        problems.append(None if image is not None else f"no image member ({', '.join(options.image_keys)})")
        labels.append(_tar_text(record, options.label or "cls"))
        captions.append(_tar_text(record, options.caption) if options.caption else None)
    paths = [f"{shard}#{key}" for shard, key in zip(shards, keys, strict=True)]
    label_name = f"{options.label or 'cls'} member"
    return _decode(paths, labels, label_name, captions, data, problems, options, done, preprocessing)


def _tar_text(record: dict[str, Any], key: str) -> str | None:
    """A text member (``cls``, ``txt``) or a field of the ``json`` member (``json:FIELD``); None when absent."""
    if key.startswith("json:"):
        raw = record.get("json")
        if not isinstance(raw, bytes):
            return None
        try:
            value = json.loads(raw).get(key[5:])
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)
    raw = record.get(key)
    return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else None


def read_parquet_files(
    task: pa.Table,
    *,
    files: list[tuple[str, str]],
    filesystem: pafs.FileSystem,
    columns: list[str],
    block_rows: int,
    **preprocess: Any,
) -> Iterator[pa.Table]:
    """The preprocessed samples of the parquet files numbered in ``task`` (a ``ray.data.range`` column ``id``;
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
    paths = [f"{file}#{key}" for key in keys]
    label_name = f"{label} column"
    return _decode(paths, labels, label_name, captions, data, problems, options, done, preprocessing)


class NoLabel(Refused):
    """A sample without the class label its job needs."""

    reason = "no_label"


class BadLabel(Refused):
    """A sample whose label is not an integer class index (in range)."""

    reason = "bad_label"


def class_id(label: str | None, options: SampleOptions, name: str = "label") -> int:
    """The integer class index a sample's ``label`` text holds; ``NoLabel`` / ``BadLabel`` say why there is none.

    ``name`` says where the label came from (``cls member``, ``label column``), for the error message.
    """
    text = (label or "").strip()
    if not text:
        raise NoLabel(f"no class label ({name})")
    if not text.isascii() or not text.isdigit() or int(text) >= 2**63:
        raise BadLabel(f"label {label!r} ({name}) is not an integer class index")
    value = int(text)
    if options.num_classes is not None and value >= options.num_classes:
        raise BadLabel(f"label {value} ({name}) is not a class index 0..{options.num_classes - 1}")
    return value


def _decode(
    paths: list[str],
    labels: list[str | None],
    label_name: str,
    captions: list[str | None],
    data: list[bytes | None],
    problems: list[str | None],
    options: SampleOptions,
    done: list[ObjectRef],
    preprocessing: Preprocessing,
) -> pa.Table:
    """Skip the samples already done, decode the rest (errors as rows) into the preprocess stage's columns."""
    import ray

    done_paths = ray.get(done[0])  # nested in a list: Ray Data passes it through unresolved
    todo = range(len(paths))
    if len(done_paths):
        todo = pc.indices_nonzero(pc.invert(pc.is_in(pa.array(paths, pa.string()), value_set=done_paths))).to_pylist()
    todo = list(todo)
    refused: dict[int, Refused] = {}
    if options.class_ids:  # the label is the class index: canonical text, or the reason there is none
        labels = list(labels)
        for i in todo:
            try:
                labels[i] = str(class_id(labels[i], options, label_name))
            except Refused as e:
                refused[i] = type(e)(f"{e} in {source_of(paths[i])}")

    def fetch(k: int) -> bytes:
        i = todo[k]
        if data[i] is None:
            raise NoImage(f"{problems[i]} in {source_of(paths[i])}")
        if i in refused:
            raise refused[i]
        return data[i]

    decoded = preprocess_images(len(todo), fetch, preprocessing)
    table = pa.table(
        {
            "path": pa.array([paths[i] for i in todo], pa.string()),
            "label": pa.array([labels[i] for i in todo], pa.string()),
            **dict(zip(decoded.column_names, decoded.columns, strict=True)),
        }
    )
    if options.caption:
        table = table.append_column("caption", pa.array([captions[i] for i in todo], pa.string()))
    return table
