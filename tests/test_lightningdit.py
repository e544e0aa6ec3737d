"""``tokenize --format lightningdit`` and ``export``: the shards read back with safetensors and torch alone.

One tokenize run of a small ImageFolder tree into shards, one parquet run of the same tree exported to shards, one
run of the same images as webdataset samples (labels: their ``cls`` class ids); LightningDiT's reader
(``safe_open`` slices of ``latents`` / ``latents_flip`` / ``labels``, ``torch.load`` of
``latents_stats.pt``) is what the checks use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import CHANNELS, SIZE, TINY, write_tar
from PIL import Image
from safetensors import safe_open

from vtp_ray import VTPReplica
from vtp_ray.images import preprocess
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.lightningdit import PATHS_KEY, SOURCE_LABELS, export_lightningdit
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset

GRID = SIZE // 16
CLASSES = ["ant", "bee", "cat"]  # label i = CLASSES[i]: ImageFolder's sorted directory order


def make_image_folder(root: Path) -> list[Path]:
    """Seven images in three class directories, and one broken file; -> the good image paths."""
    rng = np.random.default_rng(3)
    paths = []
    for i, name in enumerate(["cat", "ant", "bee", "cat", "ant", "cat", "bee"]):
        path = root / name / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (root / "bee" / "broken.jpg").write_bytes(b"not an image")
    return paths


def spec() -> PipelineSpec:
    return PipelineSpec(
        TINY, device="cpu", preprocessing=Preprocessing(SIZE), batch_size=3, labels_from_dirs=True, progress=False
    )


def read_shards(directory: Path) -> dict[str, np.ndarray | list[str]]:
    """Every shard as LightningDiT reads it (sorted glob, ``safe_open`` slices), concatenated; plus row paths."""
    out: dict[str, list] = {"latents": [], "latents_flip": [], "labels": [], "paths": []}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            assert set(f.keys()) == {"latents", "latents_flip", "labels"}
            n = f.get_slice("labels").get_shape()[0]
            for key in ("latents", "latents_flip", "labels"):
                out[key].append(f.get_slice(key)[0:n])
            out["paths"] += json.loads(f.metadata()[PATHS_KEY])
    return {
        "latents": torch.cat(out["latents"]),
        "latents_flip": torch.cat(out["latents_flip"]),
        "labels": torch.cat(out["labels"]),
        "paths": out["paths"],
    }


@pytest.fixture(scope="module")
def runs(ray_runtime, tmp_path_factory):
    """A lightningdit run (3 images per shard), then a parquet run exported to shards (2 per shard)."""
    root = tmp_path_factory.mktemp("folder")
    images = make_image_folder(root)
    out = tmp_path_factory.mktemp("out")
    shards = tokenize_dataset(str(root), str(out / "shards"), spec(), flip=True, rows_per_file=3, format="lightningdit")
    tokenize_dataset(str(root), str(out / "parquet"), spec(), flip=True)
    exported = export_lightningdit(str(out / "parquet"), str(out / "exported"), rows_per_file=2)
    return images, out, shards, exported


@pytest.mark.slow
def test_shards_as_lightningdit_reads_them(runs):
    images, out, summary, _ = runs
    assert (summary.rows, summary.errors, summary.missing) == (7, 1, 0)
    assert len(list((out / "shards").glob("latents_rank00_shard*.safetensors"))) == 3  # 3 + 3 + 2 inputs
    data = read_shards(out / "shards")
    assert data["latents"].dtype == data["latents_flip"].dtype == torch.float32
    assert data["labels"].dtype == torch.int64
    assert data["latents"].shape == data["latents_flip"].shape == (7, CHANNELS, GRID, GRID)
    expected = [CLASSES.index(Path(p).parent.name) for p in data["paths"]]
    assert data["labels"].tolist() == expected
    assert (out / "shards" / "classes.txt").read_text().split() == CLASSES
    assert sorted(data["paths"]) == sorted(str(p) for p in images)
    errors = pq.read_table(out / "shards" / "errors.parquet").to_pylist()
    assert [Path(e["path"]).name for e in errors] == ["broken.jpg"]

    stats = torch.load(out / "shards" / "latents_stats.pt")
    assert set(stats) == {"mean", "std"}
    for key in ("mean", "std"):
        assert stats[key].dtype == torch.float32 and stats[key].shape == (1, CHANNELS, 1, 1)
    latents = data["latents"].numpy().astype(np.float64)
    np.testing.assert_allclose(stats["mean"].flatten(), latents.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"].flatten(), latents.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)


@pytest.mark.slow
def test_flips_are_the_replicas_latents_of_flipped_images(runs):
    _, out, _, _ = runs
    data = read_shards(out / "shards")
    pixels = np.stack([preprocess(Path(p).read_bytes(), size=SIZE) for p in data["paths"]])
    replica = VTPReplica(TINY, device="cpu", warmup_size=0)
    # Batches of another composition than the job's: equal within float tolerance, not bit for bit.
    np.testing.assert_allclose(data["latents"].numpy(), replica.encode(pixels).latents, rtol=1e-4, atol=1e-4)
    flipped = replica.encode(np.ascontiguousarray(pixels[:, :, ::-1])).latents
    np.testing.assert_allclose(data["latents_flip"].numpy(), flipped, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_converts_parquet_without_recomputing(runs):
    _, out, _, exported = runs
    assert (exported.exported, exported.rows, exported.errors, exported.classes) == (7, 7, 1, 3)
    assert len(list((out / "exported").glob("*.safetensors"))) == 4
    data = read_shards(out / "exported")
    rows = pq.read_table(out / "parquet" / "data").to_pydict()
    order = [rows["path"].index(p) for p in data["paths"]]
    shape = (-1, CHANNELS, GRID, GRID)
    np.testing.assert_array_equal(data["latents"].numpy(), np.array(rows["latents"], np.float32)[order].reshape(shape))
    flips = np.array(rows["latents_flip"], np.float32)[order].reshape(shape)
    np.testing.assert_array_equal(data["latents_flip"].numpy(), flips)
    assert data["labels"].tolist() == [CLASSES.index(rows["label"][i]) for i in order]
    stats = torch.load(out / "exported" / "latents_stats.pt")
    std = data["latents"].numpy().astype(np.float64).std(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(stats["std"].flatten(), std, rtol=1e-5)

    again = export_lightningdit(str(out / "parquet"), str(out / "exported"), rows_per_file=2)
    assert (again.exported, again.skipped, again.rows, again.errors) == (0, 7, 7, 1)


@pytest.mark.slow
def test_resume_writes_nothing_twice(runs):
    _, out, _, _ = runs
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    root = Path(read_shards(out / "shards")["paths"][0]).parents[1]
    again = tokenize_dataset(str(root), str(out / "shards"), spec(), flip=True, rows_per_file=3, format="lightningdit")
    assert (again.skipped, again.processed, again.rows) == (8, 0, 7)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")} == before


@pytest.fixture(scope="module")
def sample_run(runs, tmp_path_factory):
    """The tree's images as two webdataset shards (``cls``: the class index; two samples without a valid one)."""
    images, _, _, _ = runs
    root = tmp_path_factory.mktemp("samples")
    for shard, chunk in enumerate((images[:4], images[4:])):
        members = {}
        for path in chunk:
            members[f"{path.stem}.png"] = path.read_bytes()
            members[f"{path.stem}.cls"] = str(CLASSES.index(path.parent.name)).encode()
        if shard:
            members.update({"bad.png": images[0].read_bytes(), "bad.cls": b"cat", "none.png": images[1].read_bytes()})
        write_tar(root / "wds" / f"{shard:05d}.tar", members)
    summary = tokenize_dataset(
        str(root / "wds"), str(root / "out"), spec(), flip=True, rows_per_file=3, format="lightningdit"
    )
    return root / "wds", root / "out", summary


@pytest.mark.slow
def test_samples_store_their_class_ids_and_the_latents_of_the_files(runs, sample_run):
    _, out, _, _ = runs
    _, output, summary = sample_run
    assert (summary.inputs, summary.rows, summary.errors, summary.missing) == (9, 7, 2, 0)
    data, files = read_shards(output), read_shards(out / "shards")
    by_name = {Path(p).stem: i for i, p in enumerate(files["paths"])}
    order = [by_name[p.rsplit("#", 1)[1]] for p in data["paths"]]
    assert data["labels"].dtype == torch.int64
    assert data["labels"].tolist() == files["labels"][order].tolist()  # the cls ids: ImageFolder's indices here
    for key in ("latents", "latents_flip"):
        np.testing.assert_allclose(data[key].numpy(), files[key][order].numpy(), rtol=1e-5, atol=1e-6)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["classes"] is None and manifest["labels"] == SOURCE_LABELS
    assert not (output / "classes.txt").exists() and (output / "latents_stats.pt").exists()
    errors = {e["path"].rsplit("#", 1)[1]: e for e in pq.read_table(output / "errors.parquet").to_pylist()}
    assert {k: e["reason"] for k, e in errors.items()} == {"bad": "bad_label", "none": "no_label"}
    shard = errors["bad"]["path"].removesuffix("#bad")
    assert errors["bad"]["error"] == f"label 'cat' (cls member) is not an integer class index in {shard}"


@pytest.mark.slow
def test_a_rerun_of_samples_redoes_only_a_lost_shard(sample_run):
    shards, output, first = sample_run
    lost = sorted(output.glob("*.safetensors"))[-1]
    with safe_open(str(lost), framework="pt") as f:
        lost_paths = json.loads(f.metadata()[PATHS_KEY])
    lost.unlink()
    again = tokenize_dataset(str(shards), str(output), spec(), flip=True, rows_per_file=3, format="lightningdit")
    assert (again.skipped, again.processed) == (9 - len(lost_paths), len(lost_paths))
    assert (again.rows, again.errors, again.missing) == (first.rows, first.errors, 0)
    paths = read_shards(output)["paths"]
    assert len(paths) == len(set(paths)) == 7


def test_unlabelled_inputs_name_the_option(tmp_path):
    make_image_folder(tmp_path)
    unlabelled = PipelineSpec(TINY, device="cpu", preprocessing=Preprocessing(SIZE), progress=False)
    with pytest.raises(ValueError, match="--labels-from-dirs"):
        tokenize_dataset(str(tmp_path), str(tmp_path / "out"), unlabelled, flip=True, format="lightningdit")
    with pytest.raises(ValueError, match="--flip"):
        tokenize_dataset(str(tmp_path), str(tmp_path / "out"), spec(), format="lightningdit")
    assert not (tmp_path / "out").exists()
