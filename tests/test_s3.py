"""``s3://`` inputs and outputs against a real S3-compatible HTTP server on loopback (moto's standalone server):
tokenize webdataset shards from a bucket into the bucket, kill the CLI driver mid-way, resume (in-process), and
nothing is lost or written twice; parquet image bytes from a bucket.
Endpoint and credentials come from the standard AWS environment variables, as in production."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import SIZE, TINY, free_port, sample_images, start_tokenize_cli, write_parquet, write_shards

from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset

pytestmark = pytest.mark.slow

BUCKET = "datasets"


@pytest.fixture(scope="module")
def s3() -> pafs.S3FileSystem:
    """A moto S3 server on a free loopback port, the AWS_* variables pointing at it, and a bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield fs
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _parts(fs: pafs.S3FileSystem, directory: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/out/{directory}", allow_not_found=True))
    # Finished parts only: a killed run can leave a whole temporary part (".part-N.parquet.tmp": S3's "rename" is a
    # copy and a delete) that the next run deletes and redoes.
    return [i for i in info if i.type == pafs.FileType.File and not i.base_name.startswith(".")]


@pytest.mark.soak
def test_s3_shards_to_s3_output_killed_and_resumed_lose_and_repeat_nothing(ray_runtime, s3, tmp_path):
    local = tmp_path / "shards"
    expected = write_shards(local, sample_images(10))
    for path in sorted(local.iterdir()):
        pafs.copy_files(str(path), f"{BUCKET}/shards/{path.name}", destination_filesystem=s3)
    expected = {f"s3://{BUCKET}/shards/{Path(p).name}": r for p, r in expected.items()}
    args = [f"s3://{BUCKET}/shards", "-o", f"s3://{BUCKET}/out", "--model", TINY, "--size", str(SIZE)]
    args += ["--device", "cpu", "--resources", "cpu", "--replicas", "1", "--batch-size", "1", "--rows-per-file", "1"]
    args += ["--address", ray_runtime, "--no-progress"]

    process = start_tokenize_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(_parts(s3, "data")) < 1:
            assert process.poll() is None, "the job ended before it could be interrupted"
            assert time.monotonic() < deadline, "no part written in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    done_before = sum(pq.read_table(f"{i.path}", filesystem=s3).num_rows for i in _parts(s3, "data"))
    assert 1 <= done_before < sum(r is None for r in expected.values())

    spec = PipelineSpec(
        TINY, device="cpu", preprocessing=Preprocessing(SIZE), resources="cpu", replicas=1, batch_size=4, progress=False
    )
    summary = tokenize_dataset(f"s3://{BUCKET}/shards", f"s3://{BUCKET}/out", spec, rows_per_file=4)
    paths = pq.read_table(f"{BUCKET}/out/data", filesystem=s3, columns=["path"]).column("path").to_pylist()
    errors = pq.read_table(f"{BUCKET}/out/errors.parquet", filesystem=s3).to_pylist()
    assert len(paths) == len(set(paths)) and sorted(paths) == sorted(p for p, r in expected.items() if r is None)
    assert {e["path"]: e["reason"] for e in errors} == {p: r for p, r in expected.items() if r}
    assert summary.skipped >= done_before and summary.inputs == len(expected) == summary.rows + summary.errors
    names = [i.base_name for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))]
    assert not [n for n in names if n.endswith(".tmp")], names  # the killed run's temporary part was cleaned up
    assert {"manifest.json", "stats.json", "errors.parquet"} <= set(names)


def test_s3_parquet_image_bytes_are_read_by_the_tasks_with_the_jobs_filesystem(ray_runtime, s3, tmp_path):
    # Parquet samples are read by vtp-ray's own read tasks (one per file, a row group at a time, here in blocks of
    # 2 samples): the S3 filesystem with its endpoint travels to them with the job.
    images = sample_images(6)
    keys, expected = sorted(images), []
    for name, chunk in (("a", keys[:4]), ("b", keys[4:])):
        write_parquet(tmp_path / f"{name}.parquet", {k: images[k] for k in chunk})
        pafs.copy_files(str(tmp_path / f"{name}.parquet"), f"{BUCKET}/pq/{name}.parquet", destination_filesystem=s3)
        expected += [f"s3://{BUCKET}/pq/{name}.parquet#{key}" for key in chunk]
    spec = PipelineSpec(
        TINY, device="cpu", preprocessing=Preprocessing(SIZE), resources="cpu", replicas=1, batch_size=2, progress=False
    )
    summary = tokenize_dataset(f"s3://{BUCKET}/pq", str(tmp_path / "out"), dataclasses.replace(spec, block_size=2))
    paths = pq.read_table(tmp_path / "out" / "data", columns=["path"]).column("path").to_pylist()
    assert sorted(paths) == expected and (summary.rows, summary.errors, summary.missing) == (6, 0, 0)
