"""Offline tokenization of image datasets into parquet latents with Ray Data (``vtp-ray tokenize``).

Pipeline::

    inputs (driver: list, skip done)  ->  read + decode + crop   ->  VTPReplica actor pool  ->  driver: parts
    path, label                           CPU tasks (map_batches)     (map_batches, callable      (LatentStore)
                                          bad input -> error row       class, actor pool)

Reading, decoding and inference overlap; the driver streams the results with ``iter_batches`` and writes them as
whole parquet parts, so rows + errors always equal the inputs, a killed job resumes where its last part ended,
and no row is written twice. See ``latent_store`` for the output layout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from . import __version__
from .dataset import discover_inputs, read_bytes
from .images import NORMALIZATIONS, PATCH_SIZE, CropMode, DecodeLimits, ImageDecodeError, preprocess_with_info
from .latent_store import ERROR_SCHEMA, FORMAT, FORMAT_VERSION, LATENT_DTYPES, LatentStore

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.data import Dataset

__all__ = ["ReplicaStartError", "TokenizeSummary", "add_cli", "build_manifest", "model_facts", "tokenize_dataset"]

log = logging.getLogger(__name__)

_ACTOR_OPTION_KEYS = frozenset({"resources", "num_gpus", "num_cpus", "memory", "accelerator_type"})
_PREPROCESSING = {
    "center": "ADM center crop: halve with a box filter while the short side >= 2 x size, bicubic-resize the "
    "short side to size, crop the center",
    "resize": "bicubic resize to size x size, aspect ratio not kept",
}


class ReplicaStartError(ValueError):
    """The model replicas failed in their constructor: a wrong model, device or precision for the workers."""


def pipeline_outputs(dataset: Dataset) -> Iterator[pa.Table]:
    """The output batches of a pipeline; replicas that fail in their constructor raise ``ReplicaStartError``."""
    try:
        yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)
    except Exception as e:  # a wrong model, device or precision for the workers: one clear line
        if (reason := replica_start_failure(e)) is None:
            raise
        raise ReplicaStartError(f"the model replicas could not start: {reason}") from e


def replica_start_failure(error: BaseException) -> str | None:
    """The last line of a replica constructor's error (``Type: message``) when ``error`` comes from one."""
    from ray.exceptions import RayActorError

    while error is not None:
        if isinstance(error, RayActorError) and error.actor_init_failed:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            return lines[-1] if lines else str(error)
        error = error.__cause__ or error.__context__
    return None


@dataclass(frozen=True)
class TokenizeSummary:
    """What a run did. ``rows`` and ``errors`` count the whole output directory (all runs)."""

    output: str
    inputs: int  # unique inputs named by this run
    skipped: int  # of those, already done by an earlier run
    processed: int  # inputs this run turned into a row or an error
    rows: int
    errors: int
    missing: int  # inputs of this run with neither a row nor an error: 0 unless the run was cut short
    seconds: float
    images_per_s: float
    stats: dict[str, Any]

    def line(self) -> str:
        return (
            f"tokenize: {self.inputs} inputs, {self.skipped} skipped (already done), {self.processed} processed "
            f"in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s); output {self.output}: "
            f"{self.rows} rows, {self.errors} errors" + (f", {self.missing} MISSING" if self.missing else "")
        )


# ------------------------------------------------------------------------------------------- the model


def model_facts(model: str, size: int | None = None) -> dict[str, Any]:
    """What the manifest records about a model spec, read from its config alone (no weights are loaded).

    With ``size``, also check that it is a multiple of the model's patch size.
    """
    from .model.checkpoint import read_spec

    resolved = read_spec(model)
    config = resolved.config
    if size is not None and size % config.vision_patch_size:
        raise ValueError(f"size {size} is not a multiple of the model's patch size {config.vision_patch_size}")
    return {
        "name": resolved.name,
        "spec": resolved.spec,
        "random_weights": resolved.random_weights,
        "config_digest": config.digest(),
        "patch_size": config.vision_patch_size,
        "latent_channels": config.latent_channels,
        "embedding_dim": config.text_embed_dim if config.train_clip else None,
    }


def build_manifest(
    model: Mapping[str, Any],
    *,
    precision: str,
    rope_dtype: str,
    size: int,
    crop: CropMode,
    flip: bool,
    latent_dtype: str,
) -> dict[str, Any]:
    """The description of an output directory: everything needed to interpret (and reproduce) its latents."""
    grid = size // int(model["patch_size"])
    latent_shape = [int(model["latent_channels"]), grid, grid]
    columns: dict[str, Any] = {"latents": {"shape": latent_shape, "dtype": latent_dtype}}
    if flip:
        columns["latents_flip"] = {"shape": latent_shape, "dtype": latent_dtype, "of": "the horizontally flipped image"}
    if model["embedding_dim"]:
        columns["clip_embedding"] = {"shape": [int(model["embedding_dim"])], "dtype": "float32", "normalized": True}
    norm = NORMALIZATIONS["imagenet"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vtp_ray_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {**model, "rope_dtype": rope_dtype},
        "precision": precision,
        "preprocessing": {
            "size": size,
            "crop": crop,
            "method": _PREPROCESSING[crop],
            "decode": "first frame, EXIF orientation applied, alpha composited over white, RGB",
            "normalization": {"kind": "imagenet", "mean": list(norm.mean), "std": list(norm.std)},
        },
        "flip": flip,
        "latent_dtype": latent_dtype,
        "columns": columns,
    }


# ------------------------------------------------------------------------------------------ the stages


def decode_images(
    batch: pa.Table, *, size: int, crop: CropMode, limits: DecodeLimits, filesystem: pafs.FileSystem | None
) -> pa.Table:
    """Read, decode and crop a batch of ``path, label`` rows (a Ray Data task).

    Adds ``width, height`` (original size), ``image`` (``size * size * 3`` uint8 bytes, HWC) and ``reason,
    error``. An input that cannot be read or decoded becomes a row with a null image and its reason: it never
    raises, so one bad file cannot fail the job.
    """
    paths = batch.column("path").to_pylist()
    images: list[bytes | None] = []
    widths: list[int | None] = []
    heights: list[int | None] = []
    reasons: list[str | None] = []
    messages: list[str | None] = []
    for path in paths:
        reason = message = None
        try:
            array, (width, height) = preprocess_with_info(
                read_bytes(path, filesystem, limits.max_bytes), size, crop, limits
            )
        except ImageDecodeError as e:
            reason, message = e.reason, str(e)
        except OSError as e:  # missing, unreadable, or a storage error
            reason, message = "unreadable", f"cannot read the file: {e}"
        except MemoryError:
            raise  # this worker's problem, not the input's: let Ray retry the task
        except Exception as e:
            reason, message = "unexpected", f"{type(e).__name__}: {e}"
        if reason is None:
            images.append(array.tobytes())
            widths.append(width)
            heights.append(height)
        else:
            images.append(None)
            widths.append(None)
            heights.append(None)
        reasons.append(reason)
        messages.append(message)
    return pa.table(
        {
            "path": batch.column("path"),
            "label": batch.column("label"),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "image": pa.array(images, pa.binary(size * size * 3)),
            "reason": pa.array(reasons, pa.string()),
            "error": pa.array(messages, pa.string()),
        }
    )


def decode_block(block: pa.Table, *, inputs: list[ObjectRef], block_rows: int, **decode: Any) -> pa.Table:
    """``decode_images`` of the input blocks numbered in ``block`` (a ``ray.data.range`` column ``id``)."""
    import ray

    table = ray.get(inputs[0])  # nested in a list: Ray Data passes it through unresolved
    rows = pa.concat_tables([table.slice(i * block_rows, block_rows) for i in block.column("id").to_pylist()])
    return decode_images(rows, **decode)


def _fixed_size_lists(values: np.ndarray, valid: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """``(n_valid, ...)`` values -> a ``len(valid)`` long fixed_size_list<dtype> array, null where not valid."""
    k = int(np.prod(values.shape[1:]))
    full = np.zeros((len(valid), k), dtype=dtype.to_pandas_dtype())
    full[valid] = values.reshape(len(values), k)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), dtype), k, mask=pa.array(~valid))


class TokenizeWorker:
    """A Ray Data actor holding one ``VTPReplica``: decoded rows in, latents and embeddings out.

    Error rows pass through untouched (their outputs are null); they never reach the model.
    """

    def __init__(
        self,
        *,
        model: str,
        device: str,
        precision: str,
        rope_dtype: str,
        cpu_threads: int | None,
        size: int,
        flip: bool,
        latent_dtype: str,
        expected_digest: str,
    ) -> None:

        from .replica import VTPReplica

        self.replica = VTPReplica(
            model, device, precision, rope_dtype, warmup_size=size, cpu_threads=replica_cpu_threads(cpu_threads, device)
        )
        info = self.replica.info
        if info["config_digest"] != expected_digest:  # e.g. a different checkpoint at the same path on this node
            raise RuntimeError(f"model {model!r} has config digest {info['config_digest']} here, not {expected_digest}")
        self.size, self.flip = size, flip
        grid = size // self.replica.patch_size
        latents = (LATENT_DTYPES[latent_dtype], (info["latent_channels"], grid, grid))
        self.columns: dict[str, tuple[pa.DataType, tuple[int, ...]]] = {"latents": latents}
        if flip:
            self.columns["latents_flip"] = latents
        if info["embedding_dim"]:
            self.columns["clip_embedding"] = (pa.float32(), (info["embedding_dim"],))
        self.name = replica_label(info["device"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        started = time.perf_counter()
        outputs = self._tokenize(batch.column("image").filter(pa.array(valid)).combine_chunks()) if valid.any() else {}
        seconds = time.perf_counter() - started
        out = batch.drop_columns(["image"])
        for name, (dtype, shape) in self.columns.items():
            values = outputs.get(name, np.zeros((0, *shape), np.float32))
            out = out.append_column(name, _fixed_size_lists(values, valid, dtype))
        # Who made each row and the model time it took: the driver reports both per replica (not stored).
        out = out.append_column("replica", pa.array([self.name] * batch.num_rows, pa.string()))
        return out.append_column("model_seconds", pa.array(np.where(valid, seconds / max(valid.sum(), 1), 0.0)))

    def _tokenize(self, images: pa.FixedSizeBinaryArray) -> dict[str, np.ndarray]:
        # The fixed-size binary column is one contiguous buffer: view it as (N, H, W, 3), then copy once, as torch
        # wants a writable array.
        width = self.size * self.size * 3
        pixels = np.frombuffer(images.buffers()[1], np.uint8, len(images) * width, images.offset * width)
        pixels = pixels.reshape(len(images), self.size, self.size, 3).copy()
        outputs = self.replica.tokenize(pixels)
        if self.flip:
            outputs["latents_flip"] = self.replica.tokenize(np.ascontiguousarray(pixels[:, :, ::-1]))["latents"]
        return outputs


def replica_label(device: str) -> str:
    """Who this actor is in run stats: host:pid, Ray node (id prefix), device and the accelerator ids Ray gave it."""
    import ray

    context = ray.get_runtime_context()
    accelerators = {k: v for k, v in context.get_accelerator_ids().items() if v}
    ids = "".join(f" {kind} {','.join(map(str, v))}" for kind, v in sorted(accelerators.items()))
    return f"{socket.gethostname()}:{os.getpid()} node {context.get_node_id()[:8]} {device}{ids}"


def replica_cpu_threads(cpu_threads: int | None, device: str) -> int | None:
    """Torch threads for a CPU replica: inside a Ray actor torch would follow ``num_cpus`` (usually 1)."""
    if cpu_threads or not device.startswith("cpu"):
        return cpu_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count()


# --------------------------------------------------------------------------------------------- the job


def _actor_options(resources: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """``{"NPU": 1}`` (Ray resources per replica) or Ray actor options -> what ``resolve_placement`` takes."""
    if isinstance(resources, str):
        return resources
    if set(resources) <= _ACTOR_OPTION_KEYS:
        return dict(resources)
    options: dict[str, Any] = {}
    custom = {}
    for key, value in resources.items():
        if key == "CPU":
            options["num_cpus"] = value
        elif key == "GPU":
            options["num_gpus"] = value
        else:
            custom[key] = value
    if custom:
        options["resources"] = custom
    return options


def _default_replicas(options: Mapping[str, Any], cluster: Mapping[str, float]) -> int:
    """One replica per accelerator the cluster has for this placement, else one."""
    wanted = {k: float(v) for k, v in (options.get("resources") or {}).items() if v}
    if options.get("num_gpus"):
        wanted["GPU"] = float(options["num_gpus"])
    if not wanted:
        return 1
    return max(1, min(int(cluster.get(k, 0) // v) for k, v in wanted.items()))


def _canonical(options: Mapping[str, Any]) -> tuple[Any, ...]:
    """What Ray Data compares to decide whether two map stages fuse (CPUs default to 1)."""
    resources = {k: float(v) for k, v in (options.get("resources") or {}).items() if v}
    cpus, gpus = float(options.get("num_cpus") or 1), float(options.get("num_gpus") or 0)
    return cpus, gpus, resources, options.get("memory"), options.get("accelerator_type")


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray this process is connected to; else join ``address`` or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = enabled
    try:
        yield
    finally:
        context.enable_progress_bars = before


@dataclass(frozen=True)
class Pipeline:
    """The settings of the Ray Data pipeline of one run."""

    model: str
    config_digest: str
    precision: str
    rope_dtype: str
    device: str
    size: int
    crop: CropMode
    batch_size: int
    replicas: int | tuple[int, int] | None
    resources: str | Mapping[str, Any]
    decode_cpus: float
    flip: bool
    latent_dtype: str
    cpu_threads: int | None
    limits: DecodeLimits
    filesystem: pafs.FileSystem | None

    def placement(self) -> tuple[dict[str, Any], str, int | tuple[int, int]]:
        """``(actor options, device, replicas)`` for the connected cluster; fails fast if it cannot fit."""
        import ray

        from .placement import PlacementError, cluster_nodes, device_for, resolve_placement

        cluster = ray.cluster_resources()
        options = resolve_placement(_actor_options(self.resources), cluster_nodes(), setting="--resources")
        device = device_for(options) if self.device == "auto" else self.device
        replicas = self.replicas or _default_replicas(options, cluster)
        if _canonical(options) == _canonical({"num_cpus": self.decode_cpus}):
            raise ValueError(
                f"decode_cpus={self.decode_cpus} equals the replicas' {options}: Ray Data would fuse decoding into "
                "the model actors; choose another value"
            )
        min_replicas = replicas if isinstance(replicas, int) else replicas[0]
        needed = min_replicas * float(options.get("num_cpus") or 0) + self.decode_cpus
        if needed > cluster.get("CPU", 0):
            raise PlacementError(
                f"{min_replicas} replica(s) with {options} and decoding ({self.decode_cpus} CPU per task) need "
                f"{needed:g} CPUs, the cluster has {cluster.get('CPU', 0):g}: lower --replicas, or give Ray more "
                "logical CPUs (ray start --num-cpus N; they may exceed the cores)"
            )
        return options, device, replicas

    def dataset(
        self,
        todo: pa.Table,
        options: Mapping[str, Any],
        device: str,
        replicas: int | tuple[int, int],
        worker: type | None = None,
        worker_kwargs: Mapping[str, Any] | None = None,
    ) -> Dataset:
        """Decode tasks (one per model batch), then a pool of ``worker`` actors (``TokenizeWorker`` by default)."""
        import ray

        # One read task per model batch, made lazily from block numbers: ray.data.from_arrow would run a metadata
        # task per block up front (minutes for millions of inputs). The input table goes through the object store
        # once.
        blocks = math.ceil(todo.num_rows / self.batch_size)
        decoded = ray.data.range(blocks, override_num_blocks=blocks).map_batches(
            decode_block,
            batch_format="pyarrow",
            batch_size=None,  # one block number per task
            fn_kwargs={
                "inputs": [ray.put(todo)],
                "block_rows": self.batch_size,
                "size": self.size,
                "crop": self.crop,
                "limits": self.limits,
                "filesystem": self.filesystem,
            },
            num_cpus=self.decode_cpus,
        )
        pool = (
            ray.data.ActorPoolStrategy(size=replicas)
            if isinstance(replicas, int)
            else ray.data.ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1])
        )
        common = {
            "model": self.model,
            "device": device,
            "precision": self.precision,
            "rope_dtype": self.rope_dtype,
            "cpu_threads": self.cpu_threads,
            "size": self.size,
            "expected_digest": self.config_digest,
        }
        if worker is None:
            worker, worker_kwargs = TokenizeWorker, {"flip": self.flip, "latent_dtype": self.latent_dtype}
        return decoded.map_batches(
            worker,
            batch_format="pyarrow",
            batch_size=self.batch_size,
            compute=pool,
            fn_constructor_kwargs={**common, **(worker_kwargs or {})},
            **options,
        )


class _PartWriter:
    """Buffers the pipeline's output on the driver and writes it as whole parts (rows and errors)."""

    def __init__(self, store: LatentStore, run: Mapping[str, Any], rows_per_file: int, flush_interval_s: float) -> None:
        self.store, self.run = store, run
        self.rows_per_file, self.flush_interval_s = rows_per_file, flush_interval_s
        self._rows: list[pa.Table] = []
        self._errors: list[pa.Table] = []
        self._pending = 0
        self._last_flush = time.monotonic()
        self.processed = 0
        self.replicas: Counter[str] = Counter()  # rows per replica
        self.busy: Counter[str] = Counter()  # seconds in the model per replica
        self.first_output: tuple[float, int] | None = None  # (time, inputs) of the first batch

    def add(self, batch: pa.Table) -> None:
        if self.first_output is None:
            self.first_output = (time.perf_counter(), batch.num_rows)
        self.processed += batch.num_rows
        for row in batch.group_by("replica").aggregate([("model_seconds", "sum")]).to_pylist():
            self.busy[row["replica"]] += row["model_seconds_sum"]
        start = 0
        while start < batch.num_rows:  # parts of at most rows_per_file inputs, whatever the batch size
            chunk = batch.slice(start, self.rows_per_file - self._pending)
            start += chunk.num_rows
            failed = chunk.column("error").is_valid()
            rows = chunk.filter(pc.invert(failed))
            self.replicas.update(rows.column("replica").to_pylist())
            self._rows.append(rows.select(self.store.schema.names))
            self._errors.append(chunk.filter(failed).select(ERROR_SCHEMA.names))
            self._pending += chunk.num_rows
            if self._pending >= self.rows_per_file or time.monotonic() - self._last_flush >= self.flush_interval_s:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            # Written with the first part, so that a run that fails before producing anything leaves no trace.
            self.store.write_manifest(device=self.run["device"].split(":")[0])
            self.store.write_part(pa.concat_tables(self._rows), pa.concat_tables(self._errors), self.run)
        self._rows, self._errors, self._pending = [], [], 0
        self._last_flush = time.monotonic()

    def run_stats(self) -> dict[str, Any]:
        """Counts and rates; "warm" counts from the first output on, when the model replicas are up."""
        stats: dict[str, Any] = {
            "processed": self.processed,
            "replicas": dict(self.replicas),
            # Against the run's seconds: a replica mostly idle is starved of input (decoding, storage).
            "replica_model_s": {name: round(seconds, 3) for name, seconds in self.busy.items()},
        }
        if self.first_output and self.processed > self.first_output[1]:
            warm_s = time.perf_counter() - self.first_output[0]
            stats["warm_images_per_s"] = round((self.processed - self.first_output[1]) / warm_s, 3)
        return stats


def check_arguments(
    size: int, batch_size: int, rows_per_file: int, latent_dtype: str, precision: str, replicas: Any
) -> None:
    from .device import PRECISIONS

    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ValueError(f"size must be a positive multiple of {PATCH_SIZE}, got {size!r}")
    if batch_size < 1 or rows_per_file < 1:
        raise ValueError(f"batch_size and rows_per_file must be >= 1, got {batch_size} and {rows_per_file}")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {list(LATENT_DTYPES)}, got {latent_dtype!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if replicas is not None and not (
        (isinstance(replicas, int) and replicas >= 1)
        or (isinstance(replicas, tuple) and len(replicas) == 2 and 1 <= replicas[0] <= replicas[1])
    ):
        raise ValueError(f"replicas must be a positive int or a (min, max) range, got {replicas!r}")


def tokenize_dataset(
    inputs: str | Sequence[str],
    output: str,
    *,
    model: str,
    precision: str = "fp32",
    device: str = "auto",
    size: int = 256,
    crop: CropMode = "center",
    batch_size: int = 32,
    replicas: int | tuple[int, int] | None = None,
    resources: str | Mapping[str, Any] = "auto",
    decode_cpus: float = 0.5,
    flip: bool = False,
    latent_dtype: str = "float32",
    labels_from_dirs: bool = False,
    address: str | None = None,
    overwrite: bool = False,
    retry_errors: bool = False,
    rows_per_file: int = 2048,
    flush_interval_s: float = 120.0,
    limits: DecodeLimits | None = None,
    rope_dtype: str = "float32",
    cpu_threads: int | None = None,
    filesystem: pafs.FileSystem | None = None,
    progress: bool = True,
) -> TokenizeSummary:
    """Tokenize every image named by ``inputs`` into parquet latents in ``output`` (layout: ``latent_store``).

    Args:
        inputs: directories, globs or manifests (see ``dataset.discover_inputs``); local or any pyarrow URI.
        output: the output directory (local or URI). Re-running on it resumes: done inputs are skipped.
        model: a model spec (checkpoint directory or ``random:vtp-small``).
        device: ``auto`` follows the placement (``npu:0`` / ``cuda:0`` / ``cpu``); or any ``VTPReplica`` device.
        replicas: actors in the model pool; ``(min, max)`` for an autoscaling pool. Default: one per NPU / GPU
            of the cluster for accelerator placements, else 1.
        resources: per replica: ``auto`` (NPU, else GPU, else CPU, from the cluster), ``npu`` / ``gpu`` / ``cpu``,
            Ray resources such as ``{"NPU": 1}``, or Ray actor options.
        decode_cpus: Ray CPUs per read + decode task. Fractional by default: decoding is light and waits on
            storage. It must differ from the replicas' CPUs, or Ray Data fuses decoding into the model actors
            (ray-project/ray#54433), where it would run in series with inference.
        flip: also store ``latents_flip``, the latents of the horizontally flipped image.
        latent_dtype: ``float32`` or ``float16`` for the stored latents (embeddings stay float32).
        address: the Ray cluster to join (``auto``: the local ``ray start`` one); default an embedded local Ray,
            or the one this process is already connected to.
        overwrite: delete an existing output first instead of resuming into it.
        retry_errors: also redo inputs that ended as errors in earlier runs.
        rows_per_file, flush_interval_s: a part is written when this many inputs are buffered, or this long
            after the previous one: the most a killed job can lose.
        limits: decoder limits; inputs over them become errors.
        cpu_threads: torch threads of a CPU replica (default: the cores of its node).
        filesystem: the pyarrow filesystem the input paths live in (default: from each path or URI).
        progress: show Ray Data's progress bars.

    Returns a ``TokenizeSummary``; the same numbers and the latent statistics are in ``output/stats.json``.
    """
    started = time.perf_counter()
    check_arguments(size, batch_size, rows_per_file, latent_dtype, precision, replicas)
    limits = limits or DecodeLimits()
    found = discover_inputs(inputs, labels_from_dirs=labels_from_dirs, filesystem=filesystem)
    facts = model_facts(model, size)
    manifest = build_manifest(
        facts, precision=precision, rope_dtype=rope_dtype, size=size, crop=crop, flip=flip, latent_dtype=latent_dtype
    )
    store = LatentStore(output, manifest, overwrite=overwrite)
    done = store.done_paths(retry_errors).combine_chunks()
    todo = found.table.filter(pc.invert(pc.is_in(found.table.column("path"), value_set=done)))
    pipeline = Pipeline(
        facts["spec"], facts["config_digest"], precision, rope_dtype, device, size, crop, batch_size, replicas,
        resources, decode_cpus, flip, latent_dtype, cpu_threads, limits, filesystem,
    )  # fmt: skip
    run: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "driver_host": socket.gethostname(),
        "decode_limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels},
        "inputs": len(found),
        "duplicate_inputs": found.duplicates,
        "skipped": len(found) - todo.num_rows,
    }
    writer = _PartWriter(store, run, rows_per_file, flush_interval_s)
    try:
        if todo.num_rows:
            with ray_session(address), progress_bars(progress):
                options, run["device"], run["replica_pool"] = pipeline.placement()
                run["replica_options"] = options
                dataset = pipeline.dataset(todo, options, run["device"], run["replica_pool"])
                try:
                    for batch in pipeline_outputs(dataset):
                        writer.add(batch)
                finally:
                    writer.flush()  # what arrived is kept, also when the job fails or is interrupted
    finally:
        # Also after a failure: the parts written so far are reflected in errors.parquet and stats.json.
        seconds = time.perf_counter() - started
        last_run = {**run, **writer.run_stats(), "seconds": round(seconds, 3)}
        last_run["images_per_s"] = round(writer.processed / seconds, 3)
        stats = store.finalize(last_run)

    accounted = pa.chunked_array([*store.row_paths().chunks, *store.merged_errors().column("path").chunks], pa.string())
    missing = pc.invert(pc.is_in(found.table.column("path"), value_set=accounted.combine_chunks()))
    summary = TokenizeSummary(
        output=output,
        inputs=len(found),
        skipped=run["skipped"],
        processed=writer.processed,
        rows=stats["rows"],
        errors=stats["errors"],
        missing=pc.sum(missing).as_py() or 0,
        seconds=seconds,
        images_per_s=last_run["images_per_s"],
        stats=stats,
    )
    if summary.missing:
        log.warning("%d inputs have neither a row nor an error: re-run the same command", summary.missing)
    if stats["duplicate_rows"]:
        log.warning("%s has %d duplicate rows: did two jobs write it at once?", output, stats["duplicate_rows"])
    return summary


# ----------------------------------------------------------------------------------------------- the CLI


def replicas_arg(text: str) -> int | tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        return (int(low), int(high)) if sep else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def resources_arg(text: str) -> str | dict[str, Any]:
    if text.lower() in ("auto", "npu", "gpu", "cuda", "cpu"):
        return text.lower()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected auto, npu, gpu, cpu or a JSON object like '{{\"NPU\": 1}}', got {text!r}"
        )
    return value


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The flags of a Ray Data run over images that ``tokenize`` and ``eval`` share."""
    p.add_argument("--size", type=int, default=256, help="square input side in pixels, a multiple of 16")
    p.add_argument("--crop", choices=["center", "resize"], default="center", help="ADM center crop, or plain resize")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument(
        "--replicas", type=replicas_arg, default=None, metavar="N|MIN-MAX",
        help="model actors, or an autoscaling range (default: one per NPU/GPU of the cluster, else 1)",
    )  # fmt: skip
    p.add_argument(
        "--resources", type=resources_arg, default="auto",
        help="per replica: auto (NPU, else GPU, else CPU), npu, gpu, cpu, or Ray resources like '{\"NPU\": 1}'",
    )  # fmt: skip
    p.add_argument("--labels-from-dirs", action="store_true", help="label = first-level sub-directory (ImageFolder)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: an embedded local Ray, or RAY_ADDRESS)")
    p.add_argument("--max-pixels", type=int, default=DecodeLimits.max_pixels, help="larger images become errors")
    p.add_argument("--max-bytes", type=int, default=DecodeLimits.max_bytes, help="larger files become errors")
    p.add_argument("--cpu-threads", type=int, help="torch threads of a CPU replica (default: the node's cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What the model flags and the shared pipeline flags pass to ``tokenize_dataset`` / ``evaluate_dataset``."""
    return {
        "model": args.model,
        "precision": args.precision,
        "device": args.device,
        "rope_dtype": args.rope_dtype,
        "size": args.size,
        "crop": args.crop,
        "batch_size": args.batch_size,
        "replicas": args.replicas,
        "resources": args.resources,
        "labels_from_dirs": args.labels_from_dirs,
        "address": args.address,
        "limits": DecodeLimits(max_bytes=args.max_bytes, max_pixels=args.max_pixels),
        "cpu_threads": args.cpu_threads,
        "progress": args.progress,
    }


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``vtp-ray tokenize`` on the ``vtp-ray`` command's subparsers."""
    from .cli import add_model_args

    p = subparsers.add_parser(
        "tokenize",
        help="tokenize an image dataset into parquet latents with Ray Data",
        description="Tokenize images into parquet latents (DIR/data), errors.parquet, stats.json and manifest.json. "
        "Re-running the same command on the same DIR resumes.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="directory (recursive), glob, manifest (.txt, or .csv/.tsv/.parquet with a path column and an "
        "optional label column) or image file; local or any pyarrow URI (s3://...)",
    )  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (local or URI)")
    add_model_args(p)
    add_pipeline_args(p)
    p.add_argument("--flip", action="store_true", help="also store latents_flip (horizontally flipped image)")
    p.add_argument("--dtype", dest="latent_dtype", choices=list(LATENT_DTYPES), default="float32",
                   help="dtype of the stored latents")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="delete existing results in DIR instead of resuming")
    p.add_argument("--retry-errors", action="store_true", help="also redo inputs recorded in errors.parquet")
    p.add_argument("--rows-per-file", type=int, default=2048, help="inputs per part file")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``vtp-ray tokenize``: prints the summary line; exit code 1 if some inputs are still missing."""
    summary = tokenize_dataset(
        args.inputs,
        args.output,
        flip=args.flip,
        latent_dtype=args.latent_dtype,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        rows_per_file=args.rows_per_file,
        **pipeline_kwargs(args),
    )
    print(summary.line())
    return 1 if summary.missing else 0
