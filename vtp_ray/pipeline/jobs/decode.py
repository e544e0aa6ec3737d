"""``vtp-ray decode``: sampled (or stored) latents -> images, through the replica pool with Ray Data.

```
driver: find_latents (LightningDiT shards, .npy / .npz, a tokenize parquet output) -> LatentChunks of batch_size rows
numbered_blocks(chunks, whole chunks per block) -> read_latents_block (CPU tasks, no torch): slice, de-normalize,
                       check finite
                       -> DecodeWorker pool (runner.replica_stage, worker.ModelStage): VTPReplica.decode
                       -> encode_pngs (CPU tasks, PNG output only)
driver: PNGs DIR/000000.png... in input order, or one ADM-style DIR/samples.npz (arr_0: uint8 (N, H, W, 3));
        inputs that cannot be decoded (non-finite values) are listed in DIR/errors.parquet
```

De-normalization (``stats``) undoes LightningDiT's ``(x - mean) / std`` as upstream's inference does:
``x * std + mean`` with a ``latents_stats.pt`` or a tokenize ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...words import plural
from ..priority import job_priority
from ..runner import ReplicaUsage, run_pipeline
from ..spec import ModelFacts, PipelineSpec
from ..stages import block_rows, numbered_blocks
from ..worker import ModelStage

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "DecodeSummary",
    "DecodeWorker",
    "LatentChunks",
    "LatentFile",
    "decode_latents",
    "find_latents",
    "load_stats",
]

NPZ_FILE = "samples.npz"
ERRORS_FILE = "errors.parquet"


@dataclass(frozen=True)
class LatentFile:
    """One file of latents: ``kind`` (``safetensors``, ``npy``, ``npz``, ``parquet``), the array ``key``, rows."""

    path: str
    kind: str
    key: str
    rows: int
    shape: tuple[int, int, int]  # (C, h, w)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 ``(n, C, h, w)``."""
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(self.path, framework="numpy") as f:
                values = f.get_slice(self.key)[start:stop]
        elif self.kind == "npy":
            values = np.load(self.path, mmap_mode="r", allow_pickle=False)[start:stop]
        elif self.kind == "npz":
            with np.load(self.path, allow_pickle=False) as archive:
                values = archive[self.key][start:stop]
        else:
            column = pq.read_table(self.path, columns=[self.key]).column(self.key).slice(start, stop - start)
            values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.asarray(values, np.float32).reshape(-1, *self.shape)


def find_latents(inputs: Sequence[str], key: str | None = None) -> list[LatentFile]:
    """The latent files named by ``inputs``: LightningDiT shard directories or ``.safetensors`` files, ``.npy`` /
    ``.npz`` files of ``(N, C, h, w)``, tokenize parquet output directories. ``key`` picks the array (default
    ``latents``; ``.npz``: ``latents`` if present, else ``arr_0``)."""
    sources: list[LatentFile] = []
    for name in inputs:
        path = Path(name).expanduser().absolute()  # Ray's workers on a cluster joined run in another directory
        if path.is_dir() and (path / "manifest.json").exists() and (path / "data").is_dir():
            manifest = json.loads((path / "manifest.json").read_text())
            column = key or "latents"
            if column not in manifest.get("columns", {}):
                raise ValueError(f"{path} has no {column!r} column (it has {list(manifest.get('columns', {}))})")
            shape = tuple(manifest["columns"][column]["shape"])
            for part in sorted((path / "data").glob("part-*.parquet")):
                rows = pq.ParquetFile(part).metadata.num_rows
                sources.append(LatentFile(str(part), "parquet", column, rows, shape))
        elif path.is_dir():
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path} holds no .safetensors shards and is no tokenize output")
            sources += [_safetensors(str(shard), key or "latents") for shard in shards]
        elif path.suffix == ".safetensors":
            sources.append(_safetensors(str(path), key or "latents"))
        elif path.suffix == ".npy":
            sources.append(_array(str(path), "npy", "", np.load(path, mmap_mode="r", allow_pickle=False).shape))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                chosen = key or ("latents" if "latents" in archive.files else "arr_0")
                if chosen not in archive.files:
                    raise ValueError(f"{path} has no array {chosen!r} (it has {archive.files})")
                sources.append(_array(str(path), "npz", chosen, archive[chosen].shape))
        elif not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        else:
            raise ValueError(f"{path}: expected a shard directory, .safetensors, .npy, .npz or a tokenize output")
    return sources


def _safetensors(path: str, key: str) -> LatentFile:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        names = set(f.keys())
        if key not in names:
            raise ValueError(f"{path} has no tensor {key!r} (it has {sorted(names)})")
        return _array(path, "safetensors", key, tuple(f.get_slice(key).get_shape()))


def _array(path: str, kind: str, key: str, shape: tuple[int, ...]) -> LatentFile:
    if len(shape) != 4:
        raise ValueError(f"{path}{':' + key if key else ''} has shape {list(shape)}, expected (N, C, h, w)")
    return LatentFile(path, kind, key, int(shape[0]), tuple(int(d) for d in shape[1:]))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` per channel from LightningDiT's ``latents_stats.pt`` or a tokenize ``stats.json``."""
    if path.endswith(".json"):
        latents = json.loads(Path(path).read_text())["latents"]
        mean, std = latents["mean"], latents["std"]
    else:
        import torch

        stats = torch.load(path, map_location="cpu", weights_only=True)
        mean, std = stats["mean"].numpy(), stats["std"].numpy()
    return np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)


# ---------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class LatentChunks:
    """What a decode run reads: ``files`` in chunks of at most ``batch_size`` rows, ``(file, start, stop, index of
    its first row in the whole run)``, read whole, several to a read task; ``stats`` (mean, std) de-normalizes
    them."""

    files: tuple[LatentFile, ...]
    chunks: tuple[tuple[int, int, int, int], ...]
    stats: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(
        cls, files: Sequence[LatentFile], batch_size: int, stats: tuple[np.ndarray, np.ndarray] | None
    ) -> LatentChunks:
        """``files`` in chunks of ``batch_size`` rows (a chunk never spans two files)."""
        chunks, first = [], 0
        for i, file in enumerate(files):
            for start in range(0, file.rows, batch_size):
                stop = min(start + batch_size, file.rows)
                chunks.append((i, start, stop, first + start))
            first += file.rows
        return cls(tuple(files), tuple(chunks), stats)

    @property
    def rows(self) -> int:
        return sum(file.rows for file in self.files)

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        """Read tasks (``read_latents_block``) of consecutive whole chunks, in input order, as many as make a block
        of ``block_rows`` decoded images (``spec.preprocessing.size`` is their side): Ray Data's cost is per block,
        and a block of one model batch paid it for a few ms of a small model's work."""
        per_block = max(1, block_rows(spec, self.rows, cpus) // spec.batch_size)
        return numbered_blocks(len(self.chunks), per_block).map_batches(
            read_latents_block,
            batch_format="pyarrow",
            batch_size=None,
            **spec.preprocess_tasks(cpus, fn_kwargs={"chunks": self.chunks, "files": self.files, "stats": self.stats}),
        )


@job_priority
def read_latents_block(
    block: pa.Table,
    *,
    chunks: Sequence[tuple[int, int, int, int]],
    files: Sequence[LatentFile],
    stats: tuple[np.ndarray, np.ndarray] | None,
) -> pa.Table:
    """The latents of the chunks numbered in ``block`` (``numbered_blocks``' ``id``): ``index, latents, reason,
    error``; non-finite latents become error rows instead of failing the batch."""
    # The block's chunks are consecutive: each file's run of them is read at once (a parquet or .npz file is read
    # whole, whatever the rows asked for).
    runs: list[list[int]] = []  # [file, start, stop, first]
    for chunk in block.column("id").to_pylist():
        file, start, stop, first = chunks[chunk]
        if runs and runs[-1][0] == file and runs[-1][2] == start:
            runs[-1][2] = stop
        else:
            runs.append([file, start, stop, first])
    latents = np.concatenate([files[file].read(start, stop) for file, start, stop, _ in runs])
    indices = [np.arange(first, first + stop - start) for _, start, stop, first in runs]
    if stats is not None:
        mean, std = stats
        latents = latents * std[None, :, None, None] + mean[None, :, None, None]
    finite = np.isfinite(latents.reshape(len(latents), -1)).all(axis=1)
    width = latents[0].nbytes
    return pa.table(
        {
            "index": pa.array(np.concatenate(indices), pa.int64()),
            "latents": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), len(latents), [None, pa.py_buffer(np.ascontiguousarray(latents).tobytes())]
            ),
            "reason": pa.array([None if ok else "bad_latents" for ok in finite], pa.string()),
            "error": pa.array([None if ok else "latents contain NaN or inf" for ok in finite], pa.string()),
        }
    )


class DecodeWorker(ModelStage):
    """The model stage: ``VTPReplica.decode`` of the valid rows' latents."""

    def __init__(self, *, latent_shape: tuple[int, int, int], **base: Any) -> None:
        super().__init__(**base)
        self.latent_shape = latent_shape
        self.image_bytes = self.spec.preprocessing.size * self.spec.preprocessing.size * 3

    def inputs(self, rows: pa.Table) -> np.ndarray:
        column = rows.column("latents").combine_chunks()
        width = int(np.prod(self.latent_shape)) * 4
        view = np.frombuffer(column.buffers()[1], np.float32, len(column) * width // 4, column.offset * width)
        return view.reshape(len(column), *self.latent_shape)

    def process(self, latents: np.ndarray, rows: pa.Table) -> np.ndarray:
        return self.replica.decode(latents)

    def columns(self, batch: pa.Table, valid: np.ndarray, result: np.ndarray | None) -> pa.Table:
        full = np.zeros((len(valid), self.image_bytes), np.uint8)
        if result is not None:
            full[valid] = result.reshape(len(result), -1)
        images = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(self.image_bytes), len(valid), [None, pa.py_buffer(full)]
        )
        return batch.drop_columns(["latents"]).append_column("image", images)


# ------------------------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class DecodeSummary:
    """What a decode run wrote."""

    output: str
    images: int
    errors: int
    seconds: float
    images_per_s: float
    random_weights: bool

    def line(self) -> str:
        return (
            f"decode: {plural(self.images, 'image')} written to {self.output} in {self.seconds:.1f}s "
            f"({self.images_per_s:.3g} images/s), {plural(self.errors, 'error')}"
            + (f" (see {ERRORS_FILE})" if self.errors else "")
            + (" (RANDOM weights: the images are meaningless)" if self.random_weights else "")
        )


def decode_latents(
    inputs: Sequence[str],
    output: str,
    spec: PipelineSpec,
    *,
    key: str | None = None,
    stats: str | None = None,
    npz: bool = False,
) -> DecodeSummary:
    """Decode every latent in ``inputs`` (see ``find_latents``) into ``output``: ``000000.png``... in input
    order, or with ``npz`` one ``samples.npz`` whose ``arr_0`` is uint8 ``(N, H, W, 3)`` (what ADM's FID evaluator
    reads). ``stats`` de-normalizes first (``x * std + mean``). ``spec.preprocessing`` is ignored: the latents
    decide the size."""
    started = time.perf_counter()
    files = find_latents(inputs, key)
    shapes = {f.shape for f in files}
    if len(shapes) != 1:
        raise ValueError(f"all latents must share one (C, h, w), got {sorted(shapes)}")
    (shape,) = shapes
    model = ModelFacts.of(spec.model)
    if shape[0] != model.latent_channels or shape[1] != shape[2]:
        raise ValueError(f"latents of shape {list(shape)} do not fit the model ({model.latent_channels} channels)")
    mean_std = load_stats(stats) if stats else None
    if mean_std is not None and len(mean_std[0]) != shape[0]:
        raise ValueError(f"{stats} holds {len(mean_std[0])} channels, the latents {shape[0]}")
    size = shape[1] * model.patch_size
    spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, size=size))
    latents = LatentChunks.of(files, spec.batch_size, mean_std)
    total = latents.rows
    os.makedirs(output, exist_ok=True)
    samples = np.zeros((total, size, size, 3), np.uint8) if npz else None
    errors: list[dict[str, Any]] = []
    usage = ReplicaUsage()
    worker = {"latent_shape": shape}

    def png_stage(dataset: Dataset, cpus: float) -> Dataset:
        return dataset.map_batches(
            encode_pngs, batch_format="pyarrow", batch_size=None, **spec.preprocess_tasks(cpus, {"size": size})
        )

    with run_pipeline(spec, latents, DecodeWorker, model, worker, then=None if npz else png_stage) as (_, batches):
        for batch in batches:
            usage.add(batch)
            _write(batch, output, size, samples, errors)
    if samples is not None:
        ok = np.ones(total, bool)
        ok[[e["index"] for e in errors]] = False
        np.savez(os.path.join(output, NPZ_FILE), arr_0=samples if ok.all() else samples[ok])
    if errors:
        pq.write_table(pa.Table.from_pylist(errors), os.path.join(output, ERRORS_FILE))
    seconds = time.perf_counter() - started
    images = usage.processed - len(errors)
    return DecodeSummary(output, images, len(errors), seconds, images / seconds, model.random_weights)


@job_priority
def encode_pngs(block: pa.Table, *, size: int) -> pa.Table:
    """The block's decoded images as PNG files' bytes (column ``png``, null for error rows) instead of their pixels:
    CPU tasks across the cluster encode them, which the driver alone could not keep up with (5 ms an image at
    256 px, against many replicas' output)."""
    from ...images import to_png_bytes

    images, failed = _images(block, size), _failed(block)
    pngs = [None if bad else to_png_bytes(image) for image, bad in zip(images, failed, strict=True)]
    return block.drop_columns(["image"]).append_column("png", pa.array(pngs, pa.binary()))


def _images(batch: pa.Table, size: int) -> np.ndarray:
    column = batch.column("image").combine_chunks()
    width = size * size * 3
    return np.frombuffer(column.buffers()[1], np.uint8, len(column) * width, column.offset * width).reshape(
        len(column), size, size, 3
    )


def _failed(batch: pa.Table) -> np.ndarray:
    return batch.column("error").is_valid().to_numpy(zero_copy_only=False)


def _write(batch: pa.Table, output: str, size: int, samples: np.ndarray | None, errors: list[dict[str, Any]]) -> None:
    """A batch's rows: its images into ``samples`` (the .npz), or its PNGs (``encode_pngs``) into ``output``; its
    error rows into ``errors``."""
    indices = batch.column("index").to_numpy()
    failed = _failed(batch)
    for row in np.flatnonzero(failed):
        errors.append({"index": int(indices[row]), "reason": batch.column("reason")[row].as_py(),
                       "error": batch.column("error")[row].as_py()})  # fmt: skip
    good = np.flatnonzero(~failed)
    if samples is not None:
        samples[indices[good]] = _images(batch, size)[good]
        return
    pngs = batch.column("png")
    for row in good:
        with open(os.path.join(output, f"{indices[row]:06d}.png"), "wb") as f:
            f.write(pngs[int(row)].as_buffer())
