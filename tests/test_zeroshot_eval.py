"""``vtp-ray eval --task zero-shot`` end to end on the shared local Ray with the tinytext model: generated images
in class folders; the predictions must equal an in-process computation of the same classifier (the accuracy itself
is meaningless with random weights). The same images in a webdataset shard, class index in ``cls``, must give the
same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import SIZE, TINYTEXT, random_image, write_tar
from PIL import Image

from vtp_ray import VTPReplica
from vtp_ray.cli import main
from vtp_ray.images import preprocess
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.zeroshot import load_classnames, load_sample_classnames, zero_shot_dataset
from vtp_ray.pipeline.report import compare_reports
from vtp_ray.pipeline.sources import sample_sort_key
from vtp_ray.text.classifier import class_embeddings
from vtp_ray.text.imagenet import imagenet_templates

pytestmark = pytest.mark.slow

CLASSES = {"n002": "dog", "n001": "cat", "n003": "red car"}  # directory -> name; index = sorted directory order


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for c, directory in enumerate(sorted(CLASSES)):
        (root / directory).mkdir()
        for i in range(3):
            Image.fromarray(random_image(70 + 7 * i, 64 + 5 * c, seed=10 * c + i)).save(root / directory / f"{i}.png")
    (root / "n002" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(random_image(64, 64, seed=99)).save(root / "loose.png")  # outside any class directory
    return root


@pytest.fixture(scope="module")
def runs(ray_runtime: str, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zeroshot")
    lines = out / "classes.txt"
    lines.write_text("".join(f"{CLASSES[d]}\n" for d in sorted(CLASSES)))
    args = ["eval", "--task", "zero-shot", str(tree), "-o", str(out / "a"), "--model", TINYTEXT, "--device", "cpu"]
    args += [
        "--resources",
        "cpu",
        "--size",
        str(SIZE),
        "--batch-size",
        "4",
        "--no-progress",
        "--classnames",
        str(lines),
    ]
    assert main(args) == 0
    mapping = out / "classes.json"
    mapping.write_text(json.dumps(CLASSES))
    spec = PipelineSpec(
        model=TINYTEXT, device="cpu", resources="cpu", preprocessing=Preprocessing(SIZE), batch_size=3, progress=False
    )
    zero_shot_dataset(str(tree), out / "b", spec, classnames=mapping)
    shard = out / "wds" / "00000.tar"
    write_tar(shard, shard_members(tree))
    zero_shot_dataset(str(shard), out / "shards", spec, classnames=lines)
    return {"a": out / "a", "b": out / "b", "shards": out / "shards", "shard": shard}


def shard_members(tree: Path) -> dict[str, bytes]:
    """The class images as webdataset samples ``<dir>_<i>`` (``cls``: the class index), and three bad labels."""
    members = {}
    for c, directory in enumerate(sorted(CLASSES)):
        for i in range(3):
            members[f"{directory}_{i}.png"] = (tree / directory / f"{i}.png").read_bytes()
            members[f"{directory}_{i}.cls"] = str(c).encode()
    image = (tree / "loose.png").read_bytes()
    members.update({"out.png": image, "out.cls": b"3", "word.png": image, "word.cls": b"dog", "none.png": image})
    return members


def test_predictions_equal_the_in_process_classifier(runs: dict, tree: Path) -> None:
    per_image = pq.read_table(runs["a"] / "per_image.parquet").to_pylist()
    assert [Path(r["path"]).relative_to(tree).as_posix() for r in per_image] == [
        f"{d}/{i}.png" for d in sorted(CLASSES) for i in range(3)
    ]
    replica = VTPReplica(TINYTEXT, device="cpu", warmup_size=0)
    names = [CLASSES[d] for d in sorted(CLASSES)]
    classifier = class_embeddings(replica.embed_text, names, imagenet_templates())
    pixels = np.stack([preprocess(Path(r["path"]).read_bytes(), size=SIZE) for r in per_image])
    scores = replica.classify(pixels, classifier)
    top, probabilities = scores.top(3)
    for row, expected, p in zip(per_image, top, probabilities, strict=True):
        assert row["target"] == sorted(CLASSES).index(row["label"])
        assert row["top5"] == expected.tolist() and row["prediction"] == expected[0]
        np.testing.assert_allclose(row["top5_probabilities"], p, rtol=1e-4, atol=1e-6)
        assert row["correct_top1"] == (expected[0] == row["target"]) and row["correct_top5"]  # 3 classes < 5


def test_report(runs: dict, tree: Path) -> None:
    report = json.loads((runs["a"] / "report.json").read_text())
    per_image = pq.read_table(runs["a"] / "per_image.parquet")
    assert report["task"] == "zero-shot" and report["classes"] == 3 and report["templates"] == 80
    assert report["counts"]["evaluated"] == 9 and report["counts"]["errors"] == 2
    assert {e["reason"] for e in report["errors"]} >= {"no_class"}
    top1 = 100 * np.mean(per_image.column("correct_top1").to_numpy(zero_copy_only=False))
    assert report["metrics"]["top1"] == pytest.approx(top1, abs=1e-3) and report["metrics"]["top5"] == 100.0


def test_json_mapping_and_compare(runs: dict) -> None:
    a, b = (pq.read_table(runs[k] / "per_image.parquet").to_pylist() for k in "ab")
    assert [r["top5"] for r in a] == [r["top5"] for r in b]  # same classes through either file form
    result = compare_reports(runs["a"], runs["b"])
    assert result["common_images"] == 9 and result["predictions"]["changed"] == 0
    assert result["metrics"]["top1"]["diff"] == 0


def test_shard_samples_are_classified_as_their_files(runs: dict, tree: Path) -> None:
    table = pq.read_table(runs["a"] / "per_image.parquet").to_pylist()
    files = {Path(r["path"]).relative_to(tree).as_posix(): r for r in table}
    rows = pq.read_table(runs["shards"] / "per_image.parquet").to_pylist()
    shard = str(runs["shard"])
    assert [r["path"] for r in rows] == sorted((r["path"] for r in rows), key=sample_sort_key)
    assert len(rows) == len(files) == 9
    for row in rows:
        twin = files[row["path"].removeprefix(f"{shard}#").replace("_", "/") + ".png"]
        assert (row["label"], row["target"]) == (str(twin["target"]), twin["target"])  # cls = the class index
        assert row["top5"] == twin["top5"] and row["correct_top1"] == twin["correct_top1"]
        np.testing.assert_allclose(row["top5_probabilities"], twin["top5_probabilities"], rtol=1e-5, atol=1e-6)
    report = json.loads((runs["shards"] / "report.json").read_text())
    assert report["source"] == {"kind": "webdataset", "files": 1} and report["classes"] == 3
    assert report["counts"]["inputs"] == 12 and report["counts"]["errors"] == 3
    errors = {e["path"].removeprefix(f"{shard}#"): (e["reason"], e["error"]) for e in report["errors"]}
    assert errors == {
        "none": ("no_label", f"no class label (cls member) in {shard}"),
        "out": ("bad_label", f"label 3 (cls member) is not a class index 0..2 in {shard}"),
        "word": ("bad_label", f"label 'dog' (cls member) is not an integer class index in {shard}"),
    }


def test_classnames_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1000 synset"):
        load_classnames(None, ["n001", "n002"])
    lines = tmp_path / "names.txt"
    lines.write_text("cat\n")
    with pytest.raises(ValueError, match="1 class names for 2"):
        load_classnames(lines, ["n001", "n002"])
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n001": "cat"}))
    with pytest.raises(ValueError, match="no class for"):
        load_classnames(mapping, ["n001", "n002"])
    assert load_sample_classnames(lines) == ["cat"] and len(load_sample_classnames(None)) == 1000
    with pytest.raises(ValueError, match="one class name per line"):
        load_sample_classnames(mapping)


def test_the_classifier_is_built_once_per_job_and_cached(runs: dict) -> None:
    """Runs a, b and shards used the same model, names (in the same order) and the 80 templates: one build, kept in
    the session's cache directory, equal to the in-process classifier; a job of another class set has its own."""
    import os

    cached = sorted((Path(os.environ["VTP_CACHE_DIR"]) / "class-embeddings").glob("*.npy"))
    replica = VTPReplica(TINYTEXT, device="cpu", warmup_size=0)
    expected = class_embeddings(replica.embed_text, [CLASSES[d] for d in sorted(CLASSES)], imagenet_templates())
    arrays = [np.load(path) for path in cached]
    matches = [a for a in arrays if a.shape == expected.shape and np.allclose(a, expected, atol=1e-5)]
    assert len(matches) == 1
