"""Webdataset tar shards and parquet files with image bytes as tokenize inputs: read by Ray Data's own readers,
decoded by vtp-ray's preprocessing, rows equal to those of the same images as files, broken samples as errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SIZE, TINY, png_bytes, sample_images, write_shards

from vtp_ray import VTPReplica
from vtp_ray.images import DecodeLimits, preprocess_with_info
from vtp_ray.pipeline import PipelineSpec
from vtp_ray.pipeline.inputs import InputError
from vtp_ray.pipeline.samples import SampleOptions, find_samples, source_of
from vtp_ray.pipeline.tokenize import tokenize_dataset

LIMITS = DecodeLimits(max_pixels=50_000)
SHAPE = (8, SIZE // 16, SIZE // 16)


def write_parquet(path: Path, images: dict[str, bytes], hub: bool = False) -> None:
    """img2dataset's parquet layout (``key``, ``jpg`` bytes, ``caption``) or the hub's ``{"bytes", "path"}`` struct."""
    keys = sorted(images)
    if hub:
        structs = [{"bytes": images[k], "path": f"{k}.img"} for k in keys] + [{"bytes": None, "path": "missing.img"}]
        table = pa.table({"image": pa.array(structs), "label": [int(k) % 3 for k in keys] + [0]})
    else:
        table = pa.table({"key": keys, "jpg": [images[k] for k in keys], "caption": [f"caption {k}" for k in keys]})
    pq.write_table(table, path, row_group_size=2)


# ------------------------------------------------------------------------------------------- discovery (fast)


def test_a_shard_directory_skips_img2datasets_sidecars(tmp_path):
    write_shards(tmp_path / "shards", sample_images())
    source = find_samples(str(tmp_path / "shards"), SampleOptions())
    assert source.kind == "webdataset"
    assert [Path(f).name for f in source.files] == ["00000.tar", "00001.tar"]
    glob = find_samples(str(tmp_path / "shards" / "*.tar"), SampleOptions())
    assert glob.files == source.files


def test_parquet_with_image_bytes_is_samples_and_a_path_manifest_is_not(tmp_path):
    write_parquet(tmp_path / "a.parquet", sample_images(2))
    write_parquet(tmp_path / "hub.parquet", sample_images(2), hub=True)
    pq.write_table(pa.table({"path": ["x.jpg"], "label": ["a"]}), tmp_path / "manifest.parquet")
    assert find_samples(str(tmp_path / "a.parquet"), SampleOptions()).image_column == "jpg"
    assert find_samples(str(tmp_path / "hub.parquet"), SampleOptions()).image_column == "image"
    assert find_samples(str(tmp_path / "manifest.parquet"), SampleOptions()) is None
    assert find_samples(str(tmp_path / "hub.parquet"), SampleOptions(key="id")).kind == "parquet"  # struct path


def test_unusable_sample_inputs_are_refused_with_the_reason(tmp_path):
    write_shards(tmp_path / "shards", sample_images(2))
    write_parquet(tmp_path / "a.parquet", sample_images(2))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InputError, match="mix"):
        find_samples([str(tmp_path / "shards"), str(tmp_path / "img")], SampleOptions())
    with pytest.raises(InputError, match="no key column 'id'"):
        find_samples(str(tmp_path / "a.parquet"), SampleOptions(key="id"))


def test_a_sample_identity_names_its_file():
    assert source_of("s3://b/laion/00001.tar#000000042") == "s3://b/laion/00001.tar"
    assert source_of("/d/x#y.parquet#k#1") == "/d/x#y.parquet"
    assert source_of("/d/plain.jpg") == "/d/plain.jpg"


# ------------------------------------------------------------------------------------------- runs (Ray)


def _spec(**changes) -> PipelineSpec:
    return PipelineSpec(TINY, device="cpu", size=SIZE, batch_size=2, limits=LIMITS, progress=False, **changes)


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    return VTPReplica(TINY, device="cpu", warmup_size=SIZE)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


@pytest.fixture(scope="module")
def tar_job(ray_runtime, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    expected = write_shards(root / "shards", images)
    output = root / "out"
    spec = _spec(samples=SampleOptions(caption="txt"))
    summary = tokenize_dataset(str(root / "shards"), str(output), spec, rows_per_file=3)
    return output, expected, summary, spec, root / "shards"


def _check_rows_are_the_files(rows: pa.Table, images: dict[str, bytes], replica: VTPReplica) -> None:
    """Each row's size and latents are those of its image as a file, preprocessed and encoded on its own."""
    rows = rows.sort_by("path")
    keys = [p.rsplit("#", 1)[1].removesuffix(".img") for p in rows.column("path").to_pylist()]
    for key, width, height in zip(
        keys, rows.column("width").to_pylist(), rows.column("height").to_pylist(), strict=True
    ):
        _, size = preprocess_with_info(images[key], SIZE, "center", LIMITS)
        assert (width, height) == size
    pixels = np.stack([preprocess_with_info(images[k], SIZE, "center", LIMITS)[0] for k in keys])
    expected = replica.encode(pixels).latents
    got = np.stack([np.asarray(v, np.float32) for v in rows.column("latents").to_pylist()]).reshape(-1, *SHAPE)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_shards_give_one_row_or_error_per_sample_equal_to_the_files(tar_job, images, replica):
    output, expected, summary, _, _ = tar_job
    rows = pq.read_table(output / "data")
    errors = pq.read_table(output / "errors.parquet")
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) and rows.num_rows + errors.num_rows == len(expected) == summary.inputs == 8
    assert sorted(paths) == sorted(p for p, reason in expected.items() if reason is None)
    assert dict(zip(*errors.select(["path", "reason"]).to_pydict().values(), strict=True)) == {
        p: r for p, r in expected.items() if r
    }
    assert all("00000.tar" in e for e in errors.column("error").to_pylist() if "member" in e)
    _check_rows_are_the_files(rows, images, replica)
    by_path = {r["path"]: r for r in rows.select(["path", "label", "caption"]).to_pylist()}
    for path, row in by_path.items():
        key = path.rsplit("#", 1)[1]
        assert (row["label"], row["caption"]) == (str(int(key) % 3), f"caption {key}")  # cls member, txt member
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["columns"]["caption"]["dtype"] == "string"
    stats = json.loads((output / "stats.json").read_text())
    assert stats["last_run"]["source"] == {"kind": "webdataset", "files": 2} and stats["duplicate_rows"] == 0


@pytest.mark.slow
def test_a_rerun_of_shards_redoes_only_the_samples_of_a_lost_part(tar_job):
    output, expected, first, spec, shards = tar_job
    lost = sorted((output / "data").glob("part-*.parquet"))[-1]
    lost_paths = set(pq.read_table(lost, columns=["path"]).column("path").to_pylist())
    lost.unlink()
    summary = tokenize_dataset(str(shards), str(output), spec, rows_per_file=3)
    assert (summary.skipped, summary.processed) == (len(expected) - len(lost_paths), len(lost_paths))
    assert summary.inputs == len(expected) and (summary.rows, summary.errors) == (first.rows, first.errors)
    paths = pq.read_table(output / "data", columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == first.rows


@pytest.mark.slow
def test_parquet_bytes_and_hub_structs_give_the_rows_of_the_files(ray_runtime, images, replica, tmp_path):
    write_parquet(tmp_path / "a.parquet", images)
    write_parquet(tmp_path / "hub.parquet", images, hub=True)
    for name, inputs in (("img2dataset", [str(tmp_path / "a.parquet")]), ("hub", [str(tmp_path / "hub.parquet")])):
        spec = _spec(samples=SampleOptions(caption="caption" if name == "img2dataset" else None))
        summary = tokenize_dataset(inputs, str(tmp_path / name), spec, rows_per_file=4)
        rows = pq.read_table(tmp_path / name / "data")
        errors = pq.read_table(tmp_path / name / "errors.parquet").to_pylist()
        _check_rows_are_the_files(rows, images, replica)
        if name == "hub":  # the struct's path is the key; a null image is an error row, the label a column
            assert [e["path"].rsplit("#", 1)[1] for e in errors] == ["missing.img"] and errors[0][
                "reason"
            ] == "no_image"
            assert sorted(rows.column("label").to_pylist()) == sorted(str(int(k) % 3) for k in images)
        else:
            assert not errors and set(rows.column("caption").to_pylist()) == {f"caption {k}" for k in images}
        assert summary.inputs == len(images) + (name == "hub") == rows.num_rows + len(errors)
