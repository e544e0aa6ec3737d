"""``vtp-ray tokenize``: images -> parquet latents and CLIP embeddings, resumable (layout: ``store``; LightningDiT's
shards: ``lightningdit``).

The job is the shared pipeline (``runner``) with ``TokenizeWorker`` as its model stage and ``PartWriter`` on the
driver, which streams the results into whole parquet parts: rows + errors always equal the inputs, a killed job
resumes where its last part ended, and no row is written twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ... import __version__
from ...images import NORMALIZATIONS
from ...words import plural
from ..runner import ReplicaUsage, run_pipeline
from ..sources import SampleSource, find_source
from ..spec import ModelFacts, PipelineSpec
from ..stages import fixed_size_lists
from ..store import ERROR_SCHEMA, FORMAT, FORMAT_VERSION, LATENT_DTYPES, LatentStore
from ..worker import ModelStage
from .lightningdit import ShardStore, check_labels, lightningdit_manifest

__all__ = ["TokenizeSummary", "TokenizeWorker", "build_manifest", "tokenize_dataset"]

log = logging.getLogger(__name__)

PREPROCESSING = {
    "center": "ADM center crop: halve with a box filter while the short side >= 2 x size, bicubic-resize the "
    "short side to size, crop the center",
    "resize": "bicubic resize to size x size, aspect ratio not kept",
}

FAST_PREPROCESS = "JPEGs decoded at the largest reduced scale (1/2, 1/4, 1/8) keeping the short side >= 2 x size"


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
    random_weights: bool
    stats: dict[str, Any]

    def line(self) -> str:
        return (
            f"tokenize: {plural(self.inputs, 'input')}, {self.skipped} skipped (already done), {self.processed} "
            f"processed in {self.seconds:.1f}s ({self.images_per_s:.3g} images/s); output {self.output}: "
            f"{plural(self.rows, 'row')}, {plural(self.errors, 'error')}"
            + (f", {self.missing} MISSING" if self.missing else "")
            + (" (RANDOM weights: the latents are meaningless)" if self.random_weights else "")
        )


def build_manifest(spec: PipelineSpec, model: ModelFacts, *, flip: bool, latent_dtype: str) -> dict[str, Any]:
    """The description of an output directory: everything needed to interpret (and reproduce) its latents."""
    prep = spec.preprocessing
    grid = prep.size // model.patch_size
    latent_shape = [model.latent_channels, grid, grid]
    columns: dict[str, Any] = {"latents": {"shape": latent_shape, "dtype": latent_dtype}}
    if flip:
        columns["latents_flip"] = {"shape": latent_shape, "dtype": latent_dtype, "of": "the horizontally flipped image"}
    if model.embedding_dim:
        columns["clip_embedding"] = {"shape": [model.embedding_dim], "dtype": "float32", "normalized": True}
    if spec.samples.caption:
        columns["caption"] = {"dtype": "string", "of": f"the sample's {spec.samples.caption!r} text"}
    norm = NORMALIZATIONS["imagenet"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vtp_ray_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {**model.to_dict(), "rope_dtype": spec.rope_dtype},
        "precision": spec.precision,
        "preprocessing": {
            "size": prep.size,
            "crop": prep.crop,
            "method": PREPROCESSING[prep.crop],
            "decode": "first frame, EXIF orientation applied, alpha composited over white, RGB",
            "normalization": {"kind": "imagenet", "mean": list(norm.mean), "std": list(norm.std)},
            # Only when on, so that exact outputs keep their manifest; resuming never mixes the two. The key keeps its
            # name from before fast preprocessing had its own word: outputs made then still resume.
            **({"draft_decode": FAST_PREPROCESS} if prep.fast else {}),
        },
        "flip": flip,
        "latent_dtype": latent_dtype,
        "columns": columns,
    }


class TokenizeWorker(ModelStage):
    """The model stage: latents (and ``latents_flip``) and CLIP embeddings of the valid rows."""

    def __init__(self, *, flip: bool, latent_dtype: str, **base: Any) -> None:
        super().__init__(**base)
        self.flip = flip
        info = self.replica.info
        grid = self.spec.preprocessing.size // info.patch_size
        latents = (LATENT_DTYPES[latent_dtype], (info.latent_channels, grid, grid))
        self.outputs: dict[str, tuple[pa.DataType, tuple[int, ...]]] = {"latents": latents}
        if flip:
            self.outputs["latents_flip"] = latents
        if info.embedding_dim:
            self.outputs["clip_embedding"] = (pa.float32(), (info.embedding_dim,))

    def process(self, images: np.ndarray, rows: pa.Table) -> dict[str, np.ndarray]:
        encoded = self.replica.encode(images)
        result = {"latents": encoded.latents, "clip_embedding": encoded.clip_embedding}
        if self.flip:
            result["latents_flip"] = self.replica.encode(np.ascontiguousarray(images[:, :, ::-1])).latents
        return result

    def columns(self, batch: pa.Table, valid: np.ndarray, result: dict[str, np.ndarray] | None) -> pa.Table:
        out = batch.drop_columns(["image"])
        for name, (dtype, shape) in self.outputs.items():
            values = None if result is None else result[name]
            out = out.append_column(name, fixed_size_lists(values, valid, dtype, shape))
        return out


class PartWriter:
    """Buffers the pipeline's output on the driver and writes it as whole parts (rows and errors)."""

    def __init__(self, store: LatentStore, run: Mapping[str, Any], rows_per_file: int, flush_interval_s: float) -> None:
        self.store, self.run = store, run
        self.rows_per_file, self.flush_interval_s = rows_per_file, flush_interval_s
        self.usage = ReplicaUsage()
        self._rows: list[pa.Table] = []
        self._errors: list[pa.Table] = []
        self._pending = 0
        self._last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        self.usage.add(batch)
        start = 0
        while start < batch.num_rows:  # parts of at most rows_per_file inputs, whatever the batch size
            chunk = batch.slice(start, self.rows_per_file - self._pending)
            start += chunk.num_rows
            failed = chunk.column("error").is_valid()
            self._rows.append(chunk.filter(pc.invert(failed)).select(self.store.schema.names))
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


def tokenize_dataset(
    inputs: str | Sequence[str],
    output: str,
    spec: PipelineSpec,
    *,
    flip: bool = False,
    latent_dtype: str = "float32",
    overwrite: bool = False,
    retry_errors: bool = False,
    rows_per_file: int = 2048,
    flush_interval_s: float = 120.0,
    format: str = "parquet",
) -> TokenizeSummary:
    """Tokenize every image named by ``inputs`` into parquet latents in ``output``.

    Args:
        inputs: directories, globs or manifests (``sources.files``), or webdataset tar shards / parquet files with
            image bytes (or directories and globs of them: ``sources.webdataset``, ``sources.parquet``); local or
            any pyarrow URI.
        output: the output directory (local or URI). Re-running on it resumes: done inputs are skipped.
        spec: model, preprocessing, batching and placement.
        flip: also store ``latents_flip``, the latents of the horizontally flipped image.
        latent_dtype: ``float32`` or ``float16`` for the stored latents (embeddings stay float32).
        overwrite: delete an existing output first instead of resuming into it.
        retry_errors: also redo inputs that ended as errors in earlier runs.
        rows_per_file, flush_interval_s: a part is written when this many inputs are buffered, or this long
            after the previous one: the most a killed job can lose.
        format: ``parquet`` (``store``), or ``lightningdit``: the safetensors shards and ``latents_stats.pt``
            LightningDiT's ``ImgLatentDataset`` reads (``lightningdit``; needs ``flip`` and a label per input: for
            sample sources an integer class id, else the input is an error row).

    Returns a ``TokenizeSummary``; the same numbers and the latent statistics are in ``output/stats.json``.
    """
    started = time.perf_counter()
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {list(LATENT_DTYPES)}, got {latent_dtype!r}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    source = find_source(inputs, spec)
    samples = isinstance(source, SampleSource)
    model = ModelFacts.of(spec.model, spec.preprocessing.size)
    manifest = build_manifest(spec, model, flip=flip, latent_dtype=latent_dtype)
    if format == "lightningdit":
        if samples:  # labels: the samples' class ids; a sample without one becomes an error row as it is read
            source = dataclasses.replace(source, options=dataclasses.replace(source.options, class_ids=True))
            classes = None
        else:
            option = "use --labels-from-dirs on an ImageFolder tree, or a manifest with a label column"
            classes = check_labels(source.table.column("label"), option)
        store: LatentStore = ShardStore(output, lightningdit_manifest(manifest, classes), overwrite=overwrite)
    elif format == "parquet":
        store = LatentStore(output, manifest, overwrite=overwrite)
    else:
        raise ValueError(f"format must be parquet or lightningdit, got {format!r}")
    done = store.done_paths(retry_errors).combine_chunks()
    limits = spec.preprocessing.limits
    run: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "driver_host": socket.gethostname(),
        # The loader's limits, under the key outputs have always carried.
        "decode_limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels},
    }
    if samples:  # samples are counted as they are read: the files are streamed once, never listed up front
        todo = source = dataclasses.replace(source, done=done)
        run.update(source=source.description(), skipped=source.skipped())
    else:
        todo = source.skipping(done)
        run.update(inputs=len(source), duplicate_inputs=source.duplicates, skipped=len(source) - len(todo))
    writer = PartWriter(store, run, rows_per_file, flush_interval_s)
    try:
        if samples or len(todo):
            worker = {"flip": flip, "latent_dtype": latent_dtype}
            with run_pipeline(spec, todo, TokenizeWorker, model, worker) as (placement, batches):
                run.update(placement.to_dict())
                try:
                    for batch in batches:
                        writer.add(batch)
                finally:
                    writer.flush()  # what arrived is kept, also when the job fails or is interrupted
    finally:
        # Also after a failure: the parts written so far are reflected in errors.parquet and stats.json.
        seconds = time.perf_counter() - started
        last_run = {**run, **writer.usage.stats(), "seconds": round(seconds, 3)}
        last_run["images_per_s"] = round(writer.usage.processed / seconds, 3)
        stats = store.finalize(last_run)

    if samples:
        # Every sample read reached the writer (a failed read fails the run): what was read is what was written.
        n_inputs, n_missing = run["skipped"] + writer.usage.processed, 0
    else:
        accounted = pa.chunked_array(
            [*store.row_paths().chunks, *store.merged_errors().column("path").chunks], pa.string()
        )
        n_inputs = len(source)
        n_missing = pc.sum(pc.invert(pc.is_in(source.table.column("path"), value_set=accounted.combine_chunks())))
        n_missing = n_missing.as_py() or 0
    summary = TokenizeSummary(
        output=output,
        inputs=n_inputs,
        skipped=run["skipped"],
        processed=writer.usage.processed,
        rows=stats["rows"],
        errors=stats["errors"],
        missing=n_missing,
        seconds=seconds,
        images_per_s=last_run["images_per_s"],
        random_weights=model.random_weights,
        stats=stats,
    )
    if summary.missing:
        log.warning("%d inputs have neither a row nor an error: re-run the same command", summary.missing)
    if stats["duplicate_rows"]:
        log.warning("%s has %d duplicate rows: did two jobs write it at once?", output, stats["duplicate_rows"])
    return summary
