"""``vtp-ray eval`` end to end on a real local Ray cluster with the tiny model (the metrics: test_quality.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import TINY
from PIL import Image

from vtp_ray import VTPReplica
from vtp_ray.cli import main
from vtp_ray.images import ImageLimits, preprocess_with_info
from vtp_ray.metrics import psnr, save_random_fid_inception, save_random_lpips
from vtp_ray.pipeline import PipelineSpec, Preprocessing, ReplicaStartError
from vtp_ray.pipeline.jobs.evaluate import evaluate_dataset
from vtp_ray.pipeline.report import compare_reports

SIZE = 64
N_IMAGES = 12
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 smooth-plus-noise images of various sizes and 1 broken file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(6)
    for i in range(N_IMAGES):
        h, w = int(rng.integers(64, 120)), int(rng.integers(64, 120))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * (i % 6))], -1)
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A locally built Inception v3 of random weights (and a random LPIPS), saved as state dict files."""
    root = tmp_path_factory.mktemp("weights")
    save_random_fid_inception(root / "inception.pt")
    save_random_lpips(root / "lpips.pt")
    return {"inception": root / "inception.pt", "lpips": root / "lpips.pt"}


@pytest.fixture(scope="module")
def runs(ray_runtime: str, images: Path, weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    spec = PipelineSpec(
        model=TINY, device="cpu", resources="cpu", preprocessing=Preprocessing(SIZE), batch_size=5, progress=False
    )
    fp32 = evaluate_dataset(
        str(images), out / "fp32", spec, save_images=3,
        inception_weights=weights["inception"], lpips_weights=weights["lpips"],
    )  # fmt: skip
    bf16 = evaluate_dataset(
        str(images), out / "bf16", replace(spec, precision="bf16"), inception_weights=weights["inception"]
    )
    return {"fp32": (fp32, out / "fp32"), "bf16": (bf16, out / "bf16")}


def test_report_and_parquet(runs: dict, images: Path) -> None:
    report, out = runs["fp32"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["counts"] == report["counts"]
    assert on_disk["model"]["name"] == "vtp-tiny" and on_disk["random_weights"] is False
    assert on_disk["precision"] == "fp32" and on_disk["device_kind"] == "cpu"
    counts = on_disk["counts"]
    assert counts["inputs"] == N_IMAGES + 1 and counts["evaluated"] == N_IMAGES and counts["errors"] == 1
    assert [e["path"] for e in on_disk["errors"]] == [str(images / "broken.jpg")]
    assert on_disk["errors"][0]["reason"] and on_disk["errors"][0]["error"]
    metrics = on_disk["metrics"]
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert metrics["psnr"]["count"] == N_IMAGES and 0 < metrics["psnr"]["mean"] < 100
    assert 0 < metrics["ssim"]["mean"] <= 1 and metrics["lpips"]["mean"] > 0
    assert on_disk["skipped_metrics"] == {}
    table = pq.read_table(out / "per_image.parquet")
    assert table.column_names == ["path", "label", "width", "height", "psnr", "ssim", "lpips"]
    assert table.column("path").to_pylist() == sorted(str(p) for p in images.glob("img*"))
    assert np.mean(table.column("psnr").to_numpy()) == pytest.approx(metrics["psnr"]["mean"])
    saved = sorted((out / "images").iterdir())  # the first 3 inputs, of which broken.jpg is one
    assert [p.name for p in saved] == ["000001_img00.png", "000002_img01.png"]
    assert Image.open(saved[0]).size == (2 * SIZE, SIZE)


def test_per_image_psnr_matches_replica(runs: dict) -> None:
    _, out = runs["fp32"]
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    replica = VTPReplica(TINY, "cpu", "fp32", warmup_size=0)
    refs = np.stack([preprocess_with_info(row["path"], SIZE, "center", ImageLimits())[0] for row in table])
    expected = psnr(refs, replica.reconstruct(refs))
    np.testing.assert_allclose([row["psnr"] for row in table], expected, rtol=1e-9)
    assert [(row["width"], row["height"]) for row in table] == [Image.open(r["path"]).size for r in table]


def test_missing_lpips_is_reported(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    report, out = runs["bf16"]
    assert "lpips" not in report["metrics"]
    assert "--lpips-weights" in report["skipped_metrics"]["lpips"]
    assert "VTP_LPIPS_WEIGHTS" in report["skipped_metrics"]["lpips"]
    assert report["precision"] == "bf16" and math.isfinite(report["metrics"]["rfid"])
    assert pq.read_table(out / "per_image.parquet").column_names == ["path", "label", "width", "height", "psnr", "ssim"]


@pytest.fixture
def cli():
    """``vtp-ray`` in-process (so that output is captured by capsys)."""
    return main


def test_compare(runs: dict, cli, capsys: pytest.CaptureFixture[str]) -> None:
    (_, a), (_, b) = runs["fp32"], runs["bf16"]
    result = compare_reports(a, b / "report.json")
    assert result["common_images"] == N_IMAGES and result["only_a"] == result["only_b"] == 0
    assert set(result["metrics"]) >= {"psnr", "ssim", "rfid", "lpips"}
    assert result["metrics"]["lpips"]["b"] is None and result["metrics"]["lpips"]["diff"] is None
    assert result["psnr_diff"]["max_abs"] >= abs(result["psnr_diff"]["mean"])
    assert cli(["eval", "--compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "vtp-tiny cpu fp32" in printed and "vtp-tiny cpu bf16" in printed
    assert "PSNR B - A (dB)" in printed and "psnr" in printed


def test_cli_errors(images: Path, tmp_path: Path, cli, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    code = cli(["eval", str(images), "-o", str(tmp_path), "--model", TINY, "--lpips-weights", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert "LPIPS weights" in err and str(missing) in err and "--lpips-weights" in err
    assert cli(["eval", "--compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_replicas_that_cannot_start_fail_with_the_reason(ray_runtime: str, images: Path, tmp_path: Path) -> None:
    spec = PipelineSpec(model=TINY, device="npu:0", resources="cpu", preprocessing=Preprocessing(SIZE), progress=False)
    with pytest.raises(ReplicaStartError, match="DeviceUnavailableError: device 'npu:0'"):
        evaluate_dataset(str(images), tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()
