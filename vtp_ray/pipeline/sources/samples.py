"""Datasets whose images live inside larger files: what webdataset tar shards (``webdataset``) and parquet files with
image bytes (``parquet``) share.

These are what ``img2dataset`` writes for LAION / DataComp / CC12M and what the Hugging Face hub serves. They are
read streaming, one read task per file (``SampleSource.read``), and every sample becomes one row whose identity (the
``path`` column everywhere: output rows, error rows, resuming) is ``<file>#<key>``:
``/data/shards/00000.tar#000000042`` or ``s3://bucket/laion/00000.parquet#000000042``.

A sample that cannot become an image (no image member, broken bytes, over a limit) is an error row: rows + errors
always equal the samples read. Jobs that need classes (zero-shot, lightningdit) set ``SampleOptions.class_ids``:
the label is then the sample's integer class index (``labels.class_id``), and a sample without a valid one is an
error row too. Samples are streamed, never listed up front: outputs are ordered by ``sample_sort_key`` (file, then
key), and ``SampleSource.first_samples`` names the first few cheaply (``eval --save-images``). This module never
imports torch: its stage runs in Ray Data's read tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ..spec import PipelineSpec, Preprocessing, SampleOptions
from ..stages import NoImage, Refused, preprocess_images
from .labels import class_id

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = ["SampleSource", "preprocess_samples", "sample_sort_key", "source_of"]


@dataclass(frozen=True)
class SampleSource:
    """Sample files of one format: their identities (as recorded in ``path``), where they live, how to read them.

    Each format subclasses it with its ``kind``, its read (``read``) and how it names its first samples
    (``first_keys``): ``webdataset.ShardSource``, ``parquet.ParquetSource``.
    """

    kind: ClassVar[str]
    files: tuple[str, ...]  # identities: absolute paths or URIs
    inner: tuple[str, ...]  # the same files as paths inside ``filesystem``
    filesystem: pafs.FileSystem
    options: SampleOptions = field(default_factory=SampleOptions)
    done: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # identities a run skips

    def description(self) -> dict[str, Any]:
        """What a run's report says of its source: ``{"kind", "files"}``."""
        return {"kind": self.kind, "files": len(self.files)}

    def skipped(self) -> int:
        """How many of ``done`` belong to these files (the samples a resumed run does not read again)."""
        return len(self.done) and int(pc.sum(pc.is_in(_file_of(self.done), value_set=pa.array(self.files))).as_py())

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        """The Ray Data read of these files and the preprocess stage: rows as ``stages.preprocess_images`` makes,
        with ``path`` and ``label`` (and ``caption`` when asked) in front; the samples in ``done`` are skipped."""
        raise NotImplementedError

    def first_keys(self, inner: str, n: int) -> list[str]:
        """The keys of the first ``n`` samples of the file ``inner``, read cheaply (no image is loaded)."""
        raise NotImplementedError

    def first_samples(self, n: int) -> list[str]:
        """The identities of the first ``n`` samples in file order."""
        found: list[str] = []
        for identity, inner in zip(self.files, self.inner, strict=True):
            if len(found) >= n:
                break
            found.extend(f"{identity}#{key}" for key in self.first_keys(inner, n - len(found)))
        return found


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


def preprocess_samples(
    paths: list[str],
    labels: list[str | None],
    label_name: str,
    captions: list[str | None],
    data: list[bytes | None],
    problems: list[str | None],
    *,
    options: SampleOptions,
    done: list[ObjectRef],
    preprocessing: Preprocessing,
) -> pa.Table:
    """The preprocess stage of one batch of samples, however their format stores them: skip the samples already
    done, load the rest (errors as rows: ``problems[i]`` says why sample i has no image ``data``).

    ``label_name`` says where the labels came from (``cls member``, ``label column``), for the error messages.
    """
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

    loaded = preprocess_images(len(todo), fetch, preprocessing)
    table = pa.table(
        {
            "path": pa.array([paths[i] for i in todo], pa.string()),
            "label": pa.array([labels[i] for i in todo], pa.string()),
            **dict(zip(loaded.column_names, loaded.columns, strict=True)),
        }
    )
    if options.caption:
        table = table.append_column("caption", pa.array([captions[i] for i in todo], pa.string()))
    return table
