"""The vtp-ray command, run as a user runs it: a real subprocess on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def vtp_ray(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vtp_ray.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_info_reports_versions_and_devices():
    result = vtp_ray("info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] and info["ray"]
    assert "cpu" in info["devices"]["types"]


def test_reconstruct_writes_pngs_and_reports_bad_files(tiny_dir, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8), mode="L").save(tmp_path / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = vtp_ray(
        "reconstruct", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "broken.jpg"),
        "--model", str(tiny_dir), "--size", "64", "--out", str(out), "--side-by-side", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 1  # one input failed
    assert "broken.jpg: skipped" in result.stderr and "not_an_image" not in result.stdout
    assert "2 reconstructed, 1 failed" in result.stdout
    assert "PSNR" in result.stdout
    for name in ("a.png", "b.png"):
        with Image.open(out / name) as im:
            assert im.size == (128, 64) and im.mode == "RGB"  # input | reconstruction


def test_verify_passes_and_fails_by_threshold(tiny_dir):
    ok = vtp_ray("verify", "--model", str(tiny_dir), "--size", "64", "--device", "cpu")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "reconstruction" in ok.stdout
    strict = vtp_ray(
        "verify", "--model", str(tiny_dir), "--size", "64", "--precision", "bf16", "--max-error", "1e-6"
    )  # fmt: skip
    assert strict.returncode == 1
    assert "FAIL" in strict.stdout


def test_bench_reports_every_verb_and_batch(tiny_dir):
    result = vtp_ray(
        "bench", "--model", str(tiny_dir), "--size", "64", "--batch-sizes", "1,2", "--warmup", "0", "--runs", "1",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["batch"], r["verb"]) for r in rows} == {
        (b, v) for b in (1, 2) for v in ("encode", "decode", "tokenize", "reconstruct")
    }
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in rows)


def test_bench_refuses_an_unknown_verb_before_loading_anything(tiny_dir):
    result = vtp_ray("bench", "--model", str(tiny_dir), "--verbs", "encode,fly")
    assert result.returncode == 2
    assert "unknown verbs ['fly']: choose from encode, decode, tokenize, reconstruct" in result.stderr


@pytest.mark.parametrize("command", ["verify", "bench", "reconstruct"])
def test_a_missing_model_path_says_how_to_get_weights(tmp_path, command):
    extra = [str(tmp_path / "x.png"), "--out", str(tmp_path)] if command == "reconstruct" else []
    result = vtp_ray(command, *extra, "--model", str(tmp_path / "VTP-Small-f16d64"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "random:vtp-small" in result.stderr
    assert "Traceback" not in result.stderr
