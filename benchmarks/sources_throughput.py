"""Tokenize throughput from webdataset tar shards and from parquet image bytes next to the same images as files,
and the driver's peak RSS over a long run of small images, in one run on one machine.

Writes ``--images`` JPEGs (300-400 px) as files, as ``--shards`` tar shards and as parquet files with a ``jpg``
column, tokenizes each (same model, batch size, placement; files before and after the others), and prints
images/s over each whole run (Ray Data's start-up included; the rate from the first output on is shown too, but it
depends on how large the first block is) and the ratio to files (goal: >= 0.95x). With ``--rss N1,N2`` it also
tokenizes N1 and N2 tiny (16 px) samples from shards and prints the driver's peak RSS after each (it must stay
flat: parts are streamed, nothing accumulates on the driver)::

    PYTHONPATH=. python benchmarks/sources_throughput.py --images 400 --shards 8 --rss 5000,20000
"""

from __future__ import annotations

import argparse
import io
import logging
import resource
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset

GOAL = 0.95


def jpegs(count: int, low: int, high: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(low, high + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_all(root: Path, images: list[bytes], shards: int) -> dict[str, str]:
    """The same images as files, as tar shards and as parquet files -> {kind: input}."""
    for sub in ("files", "shards", "parquet"):
        (root / sub).mkdir(parents=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        chunk = list(enumerate(images))[s * per : (s + 1) * per]
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for i, data in chunk:
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        table = pa.table({"key": [f"{i:09d}" for i, _ in chunk], "jpg": [d for _, d in chunk]})
        pq.write_table(table, root / "parquet" / f"{s:05d}.parquet", row_group_size=64)
        for i, data in chunk:
            (root / "files" / f"{i:09d}.jpg").write_bytes(data)
    return {kind: str(root / kind) for kind in ("files", "shards", "parquet")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:vtp-small")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rss", default="", help="N1,N2: driver peak RSS over runs of N tiny samples (e.g. 5000,20000)")
    args = p.parse_args()
    import ray

    ray.init(address="local", logging_level=logging.WARNING)
    spec = PipelineSpec(args.model, preprocessing=Preprocessing(args.size), batch_size=args.batch_size, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_all(Path(tmp) / "in", jpegs(args.images, 300, 400), args.shards)
        rates: dict[str, list[float]] = {kind: [] for kind in inputs}
        # files first and last: their mean is the baseline, so that drift in background load shifts both sides.
        for run, kind in enumerate(["files", "shards", "parquet", "files"]):
            summary = tokenize_dataset(inputs[kind], f"{tmp}/out-{kind}-{run}", spec, rows_per_file=512)
            warm = summary.stats["last_run"].get("warm_images_per_s", float("nan"))
            rates[kind].append(summary.images_per_s)
            rate = summary.images_per_s
            print(f"{kind:8s} {summary.rows} rows {rate:8.2f} images/s ({warm:.2f} from the first output)")
        files = sum(rates["files"]) / len(rates["files"])
        for kind in ("shards", "parquet"):
            ratio = rates[kind][0] / files
            print(f"{kind} / files: {ratio:.3f}x  (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})")
        if args.rss:
            tiny = PipelineSpec(
                args.model, preprocessing=Preprocessing(16 * (args.size // 256 or 1)), batch_size=64, progress=False
            )
            for n in (int(v) for v in args.rss.split(",")):
                source = write_all(Path(tmp) / f"rss{n}", jpegs(n, 16, 24, seed=n), max(n // 1000, 1))["shards"]
                summary = tokenize_dataset(source, f"{tmp}/out-rss{n}", tiny, rows_per_file=2048)
                print(f"{n} samples: {summary.rows} rows, driver peak RSS {peak_rss_mb():.0f} MB")
    ray.shutdown()


if __name__ == "__main__":
    main()
