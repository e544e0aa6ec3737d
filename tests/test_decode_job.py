"""``decode_latents`` (``vtp-ray decode``) on the shared local Ray: PNGs and an ADM-style .npz read back with
Pillow and numpy, equal to ``VTPReplica.decode`` of the same latents."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SIZE, TINY, png_array, random_image
from safetensors.numpy import save_file

from vtp_ray import VTPReplica
from vtp_ray.pipeline import PipelineSpec
from vtp_ray.pipeline.jobs.decode import LatentChunks, decode_latents, find_latents, read_latents_block
from vtp_ray.pipeline.stages import numbered_blocks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latents_and_expected() -> tuple[np.ndarray, np.ndarray]:
    replica = VTPReplica(TINY, device="cpu", warmup_size=0)
    images = np.stack([random_image(SIZE, SIZE, seed=i) for i in range(5)])
    latents = replica.encode(images).latents
    return latents, replica.decode(latents).astype(int)


def spec() -> PipelineSpec:
    return PipelineSpec(TINY, device="cpu", resources="cpu", replicas=1, batch_size=2, progress=False)


def test_npy_to_pngs_in_order_with_bad_rows_reported(ray_runtime, tmp_path, latents_and_expected) -> None:
    latents, expected = latents_and_expected
    with_nan = np.concatenate([latents[:2], np.full_like(latents[:1], np.nan), latents[2:]])
    np.save(tmp_path / "samples.npy", with_nan)
    summary = decode_latents([str(tmp_path / "samples.npy")], str(tmp_path / "out"), spec())
    assert (summary.images, summary.errors) == (5, 1)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["000000.png", "000001.png", "000003.png", "000004.png", "000005.png"]
    decoded = np.stack([png_array((tmp_path / "out" / name).read_bytes()) for name in names])
    assert np.abs(decoded.astype(int) - expected).max() <= 1  # another batch composition: within rounding
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert [(e["index"], e["reason"]) for e in errors] == [(2, "bad_latents")]


def test_normalized_shards_with_stats_to_adm_npz(ray_runtime, tmp_path, latents_and_expected, monkeypatch) -> None:
    latents, expected = latents_and_expected
    mean = latents.mean(axis=(0, 2, 3), keepdims=True)
    std = latents.std(axis=(0, 2, 3), keepdims=True)
    normalized = np.ascontiguousarray((latents - mean) / std, np.float32)  # safetensors writes the raw buffer
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, rows in enumerate((slice(0, 3), slice(3, 5))):
        tensors = {
            "latents": normalized[rows],
            "latents_flip": normalized[rows],
            "labels": np.zeros(rows.stop - rows.start, np.int64),
        }
        save_file(tensors, str(shards / f"latents_rank00_shard{i:03d}.safetensors"))
    torch.save({"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)}, shards / "latents_stats.pt")
    out = tmp_path / "out"
    # paths relative to the driver's directory, which is not that of Ray's workers (started in the repository)
    monkeypatch.chdir(tmp_path)
    summary = decode_latents(["shards"], "out", spec(), stats="shards/latents_stats.pt", npz=True)
    assert (summary.images, summary.errors) == (5, 0)
    with np.load(out / "samples.npz") as archive:
        assert archive.files == ["arr_0"]
        samples = archive["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (5, SIZE, SIZE, 3)
    assert np.abs(samples.astype(int) - expected).max() <= 1


def test_a_block_reads_its_consecutive_chunks_of_each_file_at_once(ray_runtime, tmp_path) -> None:
    # A block holds several model batches (Ray Data's cost is per block): its chunks, which may span files, come
    # back in input order with their run-wide indices, a bad row as an error row of its own.
    first = np.arange(3 * 4, dtype=np.float32).reshape(3, 4, 1, 1)
    second = -np.arange(4 * 4, dtype=np.float32).reshape(4, 4, 1, 1)
    second[1, 2] = np.inf
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "b.npy", second)
    latents = LatentChunks.of(find_latents([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]), 2, None)
    assert latents.chunks == ((0, 0, 2, 0), (0, 2, 3, 2), (1, 0, 2, 3), (1, 2, 4, 5))
    blocks = numbered_blocks(len(latents.chunks), 3).materialize()
    assert blocks.num_blocks() == 2 and blocks.take_all() == [{"id": i} for i in range(4)]

    out = read_latents_block(pa.table({"id": [0, 1, 2, 3]}), chunks=latents.chunks, files=latents.files, stats=None)
    assert out.column("index").to_pylist() == list(range(7))
    values = np.frombuffer(out.column("latents").combine_chunks().buffers()[1], np.float32).reshape(7, 4, 1, 1)
    np.testing.assert_array_equal(values, np.concatenate([first, second]))
    assert out.column("reason").to_pylist() == [None] * 4 + ["bad_latents"] + [None] * 2
