"""Fast preprocessing: JPEGs loaded in draft mode (``preprocess(..., draft=True)``, the pipeline's
``Preprocessing(fast=True)``, ``--fast-preprocess``): close to the exact ADM pixels, and an output made with it never
resumes an exact one. Fast tests, no Ray."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from helpers import TINY
from PIL import Image

from vtp_ray.cli import build_parser
from vtp_ray.cli.args import pipeline_spec
from vtp_ray.images import preprocess, preprocess_with_info
from vtp_ray.pipeline import Preprocessing
from vtp_ray.pipeline.jobs.tokenize import build_manifest
from vtp_ray.pipeline.spec import ModelFacts


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like pixels: octaves of smooth noise (detail at every scale, as in natural images)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float64)
    for octave in range(1, 7):
        step = 2**octave
        coarse = rng.integers(0, 256, (max(height // step, 2), max(width // step, 2), 3), dtype=np.uint8)
        out += np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float64)
    return (out / 6).astype(np.uint8)


def _jpeg(array: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return _jpeg(_photo(600, 800))


def test_draft_is_off_by_default_and_the_exact_path_is_unchanged(photo):
    exact, info = preprocess_with_info(photo, 64)
    np.testing.assert_array_equal(preprocess(photo, 64, draft=False), exact)
    assert info == (800, 600)


def test_the_pipelines_fast_preprocessing_is_the_draft_load_and_its_default_the_exact_one(photo):
    drafted, drafted_info = preprocess_with_info(photo, 64, draft=True)
    fast, fast_info = Preprocessing(64, fast=True).apply(photo)
    np.testing.assert_array_equal(fast, drafted)
    assert fast_info == drafted_info
    np.testing.assert_array_equal(Preprocessing(64).apply(photo)[0], preprocess(photo, 64))


def test_a_draft_decode_is_close_to_the_exact_adm_pixels_and_reports_the_full_size(photo):
    exact = preprocess(photo, 64).astype(np.int16)
    drafted, info = preprocess_with_info(photo, 64, draft=True)
    difference = np.abs(drafted.astype(np.int16) - exact)
    assert info == (800, 600)  # the file's size, not the reduced decode's
    assert difference.any()  # a 1/4-scale decode (short side 150 >= 2 x 64), not the exact path
    # Measured on photo-like images (docs/results.md, benchmarks/fast_preprocess.py): mean under 3 levels of 255.
    assert difference.mean() < 3.0 and difference.max() <= 40


def test_draft_applies_only_where_a_reduced_jpeg_decode_keeps_the_short_side_at_2x_size(photo):
    png = io.BytesIO()
    Image.fromarray(_photo(600, 800)).save(png, "PNG")
    for data, size, crop in ((png.getvalue(), 64, "center"), (photo, 64, "resize"), (photo, 256, "center")):
        np.testing.assert_array_equal(
            preprocess(data, size, crop, draft=True), preprocess(data, size, crop), err_msg=f"{size} {crop}"
        )


def test_a_drafted_exif_rotated_jpeg_is_turned_and_reports_its_displayed_size():
    array = _photo(600, 800, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    data = _jpeg(array, exif=exif.tobytes())
    exact, info = preprocess_with_info(data, 64)
    drafted, drafted_info = preprocess_with_info(data, 64, draft=True)
    assert info == drafted_info == (600, 800)
    assert np.abs(drafted.astype(np.int16) - exact).mean() < 3.0


def test_the_flags_reach_the_spec_and_a_fast_output_never_resumes_an_exact_one(capsys):
    args = build_parser().parse_args(
        ["tokenize", "in", "-o", "o", "--model", TINY, "--fast-preprocess", "--block-size", "64"]
    )
    spec = pipeline_spec(args)
    assert spec.preprocessing.fast and spec.block_size == 64
    exact = pipeline_spec(build_parser().parse_args(["eval", "in", "-o", "o", "--model", TINY]))
    assert not exact.preprocessing.fast and exact.block_size is None
    # The flag's old name still works, and is left out of the help.
    old = pipeline_spec(build_parser().parse_args(["eval", "in", "-o", "o", "--model", TINY, "--draft-decode"]))
    assert old == replace(exact, preprocessing=Preprocessing(fast=True))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tokenize", "--help"])
    help_text = capsys.readouterr().out
    assert "--fast-preprocess" in help_text and "--draft-decode" not in help_text
    model = ModelFacts.of(TINY, 64)
    drafted = build_manifest(spec, model, flip=False, latent_dtype="float32")
    plain = build_manifest(exact, model, flip=False, latent_dtype="float32")
    assert "draft_decode" not in plain["preprocessing"]
    # The manifest's words as outputs made before fast preprocessing had its name hold them: those still resume.
    assert drafted["preprocessing"]["draft_decode"] == (
        "JPEGs decoded at the largest reduced scale (1/2, 1/4, 1/8) keeping the short side >= 2 x size"
    )
