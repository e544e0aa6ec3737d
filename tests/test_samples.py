"""Webdataset tar shards and parquet files with image bytes as tokenize and eval inputs: read by Ray Data's own
readers, decoded by vtp-ray's preprocessing, rows (and metrics) equal to those of the same images as files, broken
samples as errors. Finding them and their identities are tested without Ray in ``test_sources``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SIZE, TINY, png_array, sample_images, write_parquet, write_shards

from vtp_ray import VTPReplica
from vtp_ray.images import ImageLimits, preprocess_with_info
from vtp_ray.metrics import psnr, ssim
from vtp_ray.pipeline import PipelineSpec, Preprocessing, SampleOptions
from vtp_ray.pipeline.jobs.evaluate import evaluate_dataset
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset
from vtp_ray.pipeline.sources import find_samples, sample_sort_key

LIMITS = ImageLimits(max_pixels=50_000)
PREPROCESSING = Preprocessing(SIZE, limits=LIMITS)
SHAPE = (8, SIZE // 16, SIZE // 16)


def _spec(**changes) -> PipelineSpec:
    return PipelineSpec(TINY, device="cpu", preprocessing=PREPROCESSING, batch_size=2, progress=False, **changes)


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    return VTPReplica(TINY, device="cpu", warmup_size=SIZE)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Two webdataset shards of ``images`` and two broken samples: (directory, {identity: error reason or None})."""
    root = tmp_path_factory.mktemp("wds")
    return root / "shards", write_shards(root / "shards", images)


@pytest.fixture(scope="module")
def tar_job(ray_runtime, shards, tmp_path_factory):
    directory, expected = shards
    output = tmp_path_factory.mktemp("tokenized") / "out"
    spec = _spec(samples=SampleOptions(caption="txt"))
    summary = tokenize_dataset(str(directory), str(output), spec, rows_per_file=3)
    return output, expected, summary, spec, directory


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


# ------------------------------------------------------------------------------------------- eval (Ray)

SAVE = 5  # the first 5 samples with an image member: 3 of shard 0, its broken one, then 1 of shard 1


@pytest.fixture(scope="module")
def eval_runs(ray_runtime, shards, tmp_path_factory):
    """``eval`` of the shards, saving images: (report, output directory)."""
    out = tmp_path_factory.mktemp("eval") / "shards"
    return evaluate_dataset(str(shards[0]), out, _spec(), save_images=SAVE), out


@pytest.mark.slow
def test_eval_of_shards_equals_the_images_reconstructed_as_files(eval_runs, shards, images, replica):
    (report, out), expected = eval_runs, shards[1]
    rows = pq.read_table(out / "per_image.parquet").to_pylist()
    assert [r["path"] for r in rows] == sorted((p for p, e in expected.items() if e is None), key=sample_sort_key)
    assert report["counts"]["inputs"] == len(rows) + len(report["errors"]) == len(expected) == 8
    assert report["counts"]["duplicate_inputs"] == 0 and report["source"] == {"kind": "webdataset", "files": 2}
    assert {e["path"]: e["reason"] for e in report["errors"]} == {p: e for p, e in expected.items() if e}
    assert [e["path"] for e in report["errors"]] == sorted((e["path"] for e in report["errors"]), key=sample_sort_key)
    # Each row's size and metrics are those of its image as a file, preprocessed and reconstructed in this process.
    keys = [r["path"].rsplit("#", 1)[1].removesuffix(".img") for r in rows]
    files = [preprocess_with_info(images[key], SIZE, "center", LIMITS) for key in keys]
    assert [(r["width"], r["height"]) for r in rows] == [size for _, size in files]
    pixels = np.stack([image for image, _ in files])
    reconstructed = replica.reconstruct(pixels)
    want = {"psnr": psnr(pixels, reconstructed), "ssim": ssim(pixels, reconstructed)}
    for name, values in want.items():
        # a float rounding that moves a reconstructed pixel by one level moves the metrics slightly
        np.testing.assert_allclose([r[name] for r in rows], values, rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(report["metrics"][name]["mean"], np.mean(values), rtol=1e-3, err_msg=name)


@pytest.mark.slow
def test_eval_of_shards_saves_the_first_samples(eval_runs, shards, images):
    report, out = eval_runs
    directory = shards[0]
    saved = sorted(p.name for p in (out / "images").iterdir())
    # the broken sample is one of the first five: it has no image to save, and keeps its number
    assert saved == [
        "000000_00000_000000000.png",
        "000001_00000_000000001.png",
        "000002_00000_000000002.png",
        "000004_00001_000000003.png",
    ]
    assert report["counts"]["saved_images"] == 4
    assert find_samples(str(directory), SampleOptions()).first_samples(SAVE)[3] == f"{directory / '00000.tar'}#broken"
    reference = png_array((out / "images" / saved[-1]).read_bytes())[:, :SIZE]
    np.testing.assert_array_equal(reference, preprocess_with_info(images["000000003"], SIZE, "center", LIMITS)[0])
