"""Webdataset tar shards: samples read by Ray Data's ``read_webdataset``, one read task per shard.

Members are grouped by key (the name up to its first dot); the image is the first member present among
``image_keys`` (``jpg``, ``jpeg``, ``png``, ``webp``); the label is the ``cls`` member (or ``json:FIELD``), the
caption (when asked) the ``txt`` member. Ray Data's own member decoders never run (no pickle, no image loading
without limits): image bytes go through the run's ``Preprocessing`` (with its limits), here. Sidecar files next to the
shards (img2dataset's ``.parquet`` and ``_stats.json``) are not shards and are skipped (``sources.find``).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..priority import job_priority
from ..spec import PipelineSpec, Preprocessing, SampleOptions
from .samples import SampleSource, preprocess_samples

if TYPE_CHECKING:
    import pandas as pd
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = ["SHARD_EXTENSIONS", "ShardSource", "is_shard", "preprocess_tar"]

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
#: A tar member's sample key and extension, as ``read_webdataset`` splits them (the key ends at the first dot of the
#: base name).
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def is_shard(name: str) -> bool:
    """Whether a file name is a tar shard's."""
    return name.lower().endswith(SHARD_EXTENSIONS)


@dataclass(frozen=True)
class ShardSource(SampleSource):
    """Webdataset tar shards."""

    kind = "webdataset"

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        import ray

        # decoder=None: members stay bytes; nothing is unpickled or decoded without limits by Ray Data.
        read = ray.data.read_webdataset(
            list(self.inner),
            filesystem=self.filesystem,
            decoder=None,
            file_extensions=None,
            **spec.preprocess_tasks(cpus),
            # One read task per shard, as planned: a higher parallelism would split each read's blocks, which stops
            # Ray Data from fusing the preprocessing into the read (the raw bytes would cross the object store).
            override_num_blocks=len(self.inner),
        )
        return read.map_batches(
            preprocess_tar,
            batch_format="pandas",
            batch_size=None,
            **spec.preprocess_tasks(
                cpus,
                fn_kwargs={
                    "ids": dict(zip(self.inner, self.files, strict=True)),
                    "options": self.options,
                    "done": [ray.put(self.done)],
                    "preprocessing": spec.preprocessing,
                },
            ),
        )

    def first_keys(self, inner: str, n: int) -> list[str]:
        """From the member headers, streaming; only samples with an image member count."""
        keys: dict[str, None] = {}
        with self.filesystem.open_input_stream(inner) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isreg() else None
                if match and match.group(2) in self.options.image_keys:
                    keys[match.group(1)] = None
                    if len(keys) >= n:
                        break
        return list(keys)


@job_priority
def preprocess_tar(
    batch: pd.DataFrame,
    *,
    ids: dict[str, str],
    options: SampleOptions,
    done: list[ObjectRef],
    preprocessing: Preprocessing,
) -> pa.Table:
    """Webdataset samples (``read_webdataset`` rows, undecoded) -> preprocessed rows, errors as rows. ``ids`` maps
    the shards' paths inside their filesystem to their identities."""
    keys = [str(k) for k in batch["__key__"]]
    shards = [ids.get(url, url) for url in batch["__url__"]]
    data, labels, captions, problems = [], [], [], []
    for record in batch.to_dict("records"):
        image = next((record[k] for k in options.image_keys if isinstance(record.get(k), bytes)), None)
        data.append(image)
        problems.append(None if image is not None else f"no image member ({', '.join(options.image_keys)})")
        labels.append(_text(record, options.label or "cls"))
        captions.append(_text(record, options.caption) if options.caption else None)
    paths = [f"{shard}#{key}" for shard, key in zip(shards, keys, strict=True)]
    return preprocess_samples(
        paths,
        labels,
        f"{options.label or 'cls'} member",
        captions,
        data,
        problems,
        options=options,
        done=done,
        preprocessing=preprocessing,
    )


def _text(record: dict[str, Any], key: str) -> str | None:
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
