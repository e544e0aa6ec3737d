"""Tests for vtp_ray.images: decoding, preprocessing and normalization, on real Pillow-made images."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtp_ray.images import (
    NORMALIZATIONS,
    ImageLimits,
    ImageLoadError,
    Normalization,
    center_crop_adm,
    load_image,
    preprocess,
    preprocess_with_info,
    resize_plain,
    to_png_bytes,
    to_rgb,
)
from vtp_ray.normalize import denormalize_to_uint8, normalize

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def row(mode: str, values: list) -> Image.Image:
    """A 1-pixel-high image with the given pixel values, left to right."""
    img = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        img.putpixel((x, 0), value)
    return img


def palette_row(indices: list[int]) -> Image.Image:
    img = row("P", indices)
    img.putpalette([*RED, *BLUE])
    return img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).reshape(-1, 3).astype(int)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header (with a 1x1 mode "1" payload) whose IHDR claims ``width x height``."""
    data = encode(Image.new("1", (1, 1)), "PNG")
    # Layout: 8-byte signature, IHDR length (4), b"IHDR" (4), 13 bytes of IHDR data, CRC (4).
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


# ----------------------------------------------------------------------------------------- mode handling

# (case id, encoded image factory, expected RGB pixels left to right, absolute tolerance)
MODE_CASES: list[tuple[str, Callable[[], bytes], list[tuple[int, int, int]], int]] = [
    ("1", lambda: encode(row("1", [0, 1]), "PNG"), [BLACK, WHITE], 0),
    ("L", lambda: encode(row("L", [0, 200]), "PNG"), [BLACK, (200, 200, 200)], 0),
    ("LA", lambda: encode(row("LA", [(100, 0), (100, 255)]), "PNG"), [WHITE, (100, 100, 100)], 0),
    ("P", lambda: encode(palette_row([0, 1]), "PNG"), [RED, BLUE], 0),
    ("P+transparency", lambda: encode(palette_row([0, 1]), "PNG", transparency=1), [RED, WHITE], 0),
    (
        "L+transparency",
        lambda: encode(row("L", [7, 200]), "PNG", transparency=7),
        [WHITE, (200, 200, 200)],
        0,
    ),
    ("RGB+transparency", lambda: encode(row("RGB", [RED, BLUE]), "PNG", transparency=RED), [WHITE, BLUE], 0),
    ("RGBA", lambda: encode(row("RGBA", [(255, 0, 0, 0), (255, 0, 0, 255)]), "PNG"), [WHITE, RED], 0),
    # Half transparent red over white: 255 * 127 / 255 in green and blue, give or take Pillow's rounding.
    ("RGBA-half", lambda: encode(row("RGBA", [(255, 0, 0, 128)]), "PNG"), [(255, 127, 127)], 1),
    ("CMYK-tiff", lambda: encode(row("CMYK", [(0, 0, 0, 0), (0, 255, 255, 0)]), "TIFF"), [WHITE, RED], 0),
    ("CMYK-jpeg", lambda: encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"), [WHITE] * 256, 2),
    (
        "I;16",
        lambda: encode(row("I;16", [0, 300, 32896, 65535]), "PNG"),
        [BLACK, (1, 1, 1), (128, 128, 128), WHITE],
        0,
    ),
    ("I;16B", lambda: encode(row("I;16B", [0, 65535]), "TIFF"), [BLACK, WHITE], 0),
    ("I", lambda: encode(row("I", [-5, 127, 1000]), "TIFF"), [BLACK, (127, 127, 127), WHITE], 0),
    ("F", lambda: encode(row("F", [-5.0, 127.6, 1000.0]), "TIFF"), [BLACK, (127, 127, 127), WHITE], 0),
    ("LAB", lambda: encode(row("LAB", [(255, 128, 128), (0, 128, 128)]), "TIFF"), [WHITE, BLACK], 2),
]


@pytest.mark.parametrize(
    ("encoded", "expected", "atol"),
    [pytest.param(factory, expected, atol, id=case) for case, factory, expected, atol in MODE_CASES],
)
def test_decode_modes_to_rgb(encoded: Callable[[], bytes], expected: list, atol: int) -> None:
    img = load_image(encoded())
    assert img.mode == "RGB"
    np.testing.assert_allclose(pixels(img), np.array(expected), atol=atol)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        pytest.param(row("HSV", [(0, 255, 255), (0, 0, 255)]), [RED, WHITE], id="HSV"),
        # In memory: Pillow 10.0 cannot read back the YCbCr TIFFs it writes.
        pytest.param(row("YCbCr", [(255, 128, 128), (0, 128, 128)]), [WHITE, BLACK], id="YCbCr"),
        pytest.param(row("RGBa", [(0, 0, 0, 0), (255, 0, 0, 255)]), [WHITE, RED], id="RGBa"),
        pytest.param(row("RGBX", [(255, 0, 0, 0)]), [RED], id="RGBX"),
    ],
)
def test_to_rgb_in_memory_modes(img: Image.Image, expected: list) -> None:
    out = to_rgb(img)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(pixels(out), np.array(expected))


def test_to_rgb_returns_plain_rgb_unchanged() -> None:
    img = Image.new("RGB", (2, 2), RED)
    assert to_rgb(img) is img


# -------------------------------------------------------------------------------------- orientation, frames


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    # A 4x2 grid of distinct colours; blocks are 16 px for JPEG so compression artefacts stay small.
    block = 1 if fmt == "PNG" else 16
    colours = np.array(
        [[RED, (0, 255, 0), BLUE, BLACK], [WHITE, (255, 255, 0), (0, 255, 255), (255, 0, 255)]],
        dtype=np.uint8,
    )
    stored = colours.repeat(block, axis=0).repeat(block, axis=1)  # (2 * block, 4 * block, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored image must be rotated 90 degrees clockwise for display
    params: dict[str, object] = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    data = encode(Image.fromarray(stored), fmt, exif=exif, **params)

    img = load_image(data)

    assert img.size == (2 * block, 4 * block)  # (width, height)
    expected = np.rot90(colours, k=-1)  # clockwise
    got = np.asarray(img)[block // 2 :: block, block // 2 :: block]  # one sample per block
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=0 if fmt == "PNG" else 12)


def test_preprocess_with_info_reports_size_after_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (64, 32), RED), "PNG", exif=exif)
    arr, orig_size = preprocess_with_info(data, size=16)
    assert orig_size == (32, 64)
    assert arr.shape == (16, 16, 3)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
    ids=["gif", "apng", "webp"],
)
def test_animated_image_gives_first_frame(fmt: str, params: dict) -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 2  # really animated

    img = load_image(data)

    assert img.mode == "RGB"
    assert img.size == (8, 8)
    assert {tuple(p) for p in pixels(img)} == {RED}


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt: str) -> None:
    data = encode(noise(64, 64), fmt)
    with pytest.raises(ImageLoadError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.reason == "truncated"
    assert info.value.__cause__ is not None  # Pillow's error is chained


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert info.value.reason == "not_an_image"


@pytest.mark.parametrize("data", [b"", bytearray()], ids=["bytes", "bytearray"])
def test_empty_input(data: bytes) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert info.value.reason == "empty"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "empty"


def test_too_large_bytes(tmp_path: Path) -> None:
    data = encode(noise(32, 32), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for src in (data, path):
        with pytest.raises(ImageLoadError) as info:
            load_image(src, limits)
        assert info.value.reason == "too_large_bytes"
        assert "set max_bytes" in str(info.value)
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (32, 32)


def test_too_many_pixels_with_custom_limit() -> None:
    data = encode(Image.new("RGB", (300, 300), RED), "PNG")
    with pytest.raises(ImageLoadError) as info:
        load_image(data, ImageLimits(max_pixels=1000))
    assert info.value.reason == "too_many_pixels"
    assert str(info.value) == ("image has 90000 pixels (300x300), over the limit of 1000 (set max_pixels to raise it)")
    assert load_image(data, ImageLimits(max_pixels=90_000)).size == (300, 300)


def test_too_many_pixels_is_checked_before_decoding() -> None:
    # The header claims 20000x20000 but there is pixel data for 1x1 only: decoding would report a truncated
    # image, so "too_many_pixels" proves the check ran on the header alone.
    data = png_claiming_size(20_000, 20_000)
    assert len(data) < 100
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert info.value.reason == "too_many_pixels"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_many_pixels_own_check_at_default_limit() -> None:
    # 1e8 pixels: over the default max_pixels, but below Pillow's hard error (twice its limit), so this is
    # caught by load_image's own header check rather than by Pillow.
    with pytest.raises(ImageLoadError) as info:
        load_image(png_claiming_size(10_000, 10_000))
    assert info.value.reason == "too_many_pixels"
    assert "set max_pixels" in str(info.value)


def test_decompression_bomb_warning_as_error_maps_to_too_many_pixels() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError) as info:
            load_image(png_claiming_size(10_000, 10_000))
    assert info.value.reason == "too_many_pixels"


def test_eps_is_refused() -> None:
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert info.value.reason == "unsupported"


def test_decode_error_is_a_picklable_value_error() -> None:
    err = ImageLoadError("truncated", "image data is truncated")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, str(copy)) == ("truncated", "image data is truncated")


def test_decode_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels"])
@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_decode_limits_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ImageLimits(**{field: value})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- paths


def test_path_input(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (5, 3), RED).save(path)
    for src in (path, str(path)):
        img = load_image(src)
        assert img.size == (5, 3)
        assert img.getpixel((4, 2)) == RED


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError):
        preprocess(str(tmp_path / "missing.png"))


# ------------------------------------------------------------------------------------------- preprocess


def test_center_crop_adm_matches_step_by_step_pillow() -> None:
    img = noise(1024, 512)
    # Short side 512 >= 2 * 256: one box halving to 512x256; scale is then 1.0; crop the middle 256 columns.
    step = img.resize((512, 256), resample=Image.Resampling.BOX)
    step = step.resize((512, 256), resample=Image.Resampling.BICUBIC)
    expected = np.asarray(step)[0:256, 128:384]

    out = center_crop_adm(img, 256)

    assert out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_center_crop_adm_without_halving() -> None:
    img = noise(700, 500)
    # 500 < 512: no box step; scale 256 / 500 gives 358x256; left = (358 - 256) // 2 = 51.
    expected = np.asarray(img.resize((358, 256), resample=Image.Resampling.BICUBIC))[:, 51:307]
    np.testing.assert_array_equal(np.asarray(center_crop_adm(img, 256)), expected)


@pytest.mark.parametrize("shape", [(256, 256), (100, 300), (1000, 37), (2048, 4096)])
def test_center_crop_adm_output_size(shape: tuple[int, int]) -> None:
    assert center_crop_adm(Image.new("RGB", shape), 256).size == (256, 256)


def test_resize_plain() -> None:
    out = resize_plain(Image.new("RGB", (100, 300), RED), 64)
    assert out.size == (64, 64)
    assert {tuple(p) for p in pixels(out)} == {RED}


def test_preprocess_output_contract() -> None:
    data = encode(noise(320, 200), "PNG")
    arr, orig_size = preprocess_with_info(data, size=128)
    assert orig_size == (320, 200)
    assert arr.shape == (128, 128, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable
    np.testing.assert_array_equal(arr, np.asarray(center_crop_adm(load_image(data), 128)))
    np.testing.assert_array_equal(preprocess(data, size=128), arr)


@pytest.mark.parametrize("crop", ["center", "resize"])
def test_preprocess_accepts_image_and_array(crop: str) -> None:
    rgb = np.asarray(noise(90, 50))
    from_array, size_a = preprocess_with_info(rgb, size=32, crop=crop)  # type: ignore[arg-type]
    from_image, size_i = preprocess_with_info(Image.fromarray(rgb), size=32, crop=crop)  # type: ignore[arg-type]
    assert from_array.shape == (32, 32, 3)
    assert size_a == size_i == (90, 50)
    np.testing.assert_array_equal(from_array, from_image)


def test_preprocess_resize_mode_ignores_aspect_ratio() -> None:
    img = noise(100, 300)
    out = preprocess(img, size=64, crop="resize")
    np.testing.assert_array_equal(out, np.asarray(img.resize((64, 64), resample=Image.Resampling.BICUBIC)))


def test_preprocess_flattens_image_modes() -> None:
    out = preprocess(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), size=16)
    assert {tuple(p) for p in out.reshape(-1, 3).tolist()} == {WHITE}


@pytest.mark.parametrize("size", [0, -16, 250, 17, 8])
def test_preprocess_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        preprocess(Image.new("RGB", (64, 64)), size=size)


def test_preprocess_rejects_bad_crop_and_arrays() -> None:
    with pytest.raises(ValueError, match="crop"):
        preprocess(Image.new("RGB", (64, 64)), size=16, crop="fill")  # type: ignore[arg-type]
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            preprocess(bad, size=16)


def test_preprocess_propagates_decode_errors() -> None:
    with pytest.raises(ImageLoadError):
        preprocess(b"definitely not an image")


# ---------------------------------------------------------------------------------------- normalization


def all_values_batch() -> np.ndarray:
    """(2, 16, 16, 3) uint8 batch containing every byte value in every channel."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    first = np.stack([values, values.T, 255 - values], axis=-1)
    return np.stack([first, first[::-1, ::-1]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["imagenet", "half"])
def test_normalize_matches_float64_formula(kind: str, device: str) -> None:
    batch = all_values_batch()
    norm = NORMALIZATIONS[kind]
    expected = (batch.astype(np.float64) / 255.0 - np.array(norm.mean)) / np.array(norm.std)
    expected = expected.transpose(0, 3, 1, 2)

    out = normalize(torch.from_numpy(batch).to(device), kind)  # type: ignore[arg-type]

    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float32
    assert out.device.type == device
    assert out.is_contiguous()
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["imagenet", "half"])
def test_normalize_denormalize_round_trip_is_exact(kind: str, device: str) -> None:
    batch = torch.from_numpy(all_values_batch()).to(device)
    back = denormalize_to_uint8(normalize(batch, kind), kind)  # type: ignore[arg-type]
    assert back.shape == batch.shape
    assert back.dtype == torch.uint8
    assert back.device == batch.device
    assert back.is_contiguous()
    assert torch.equal(back, batch)


def test_normalize_other_dtypes() -> None:
    batch = torch.from_numpy(all_values_batch())
    out64 = normalize(batch, "half", dtype=torch.float64)
    assert out64.dtype == torch.float64
    assert out64.min().item() == -1.0 and out64.max().item() == 1.0
    out16 = normalize(batch, dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    # Computed in float32 and rounded once.
    assert torch.equal(out16, normalize(batch).to(torch.bfloat16))
    # float64 input to the inverse is computed in float32 and still round-trips.
    assert torch.equal(denormalize_to_uint8(out64, "half"), batch)


def test_normalize_accepts_custom_normalization() -> None:
    identity = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    assert torch.equal(normalize(batch, identity), torch.ones(1, 3, 2, 2))


def test_denormalize_clamps_and_rounds() -> None:
    # "half": pixel = (x + 1) * 127.5; out of range values clamp, 0.004 * 127.5 + 127.5 = 128.01 -> 128.
    x = torch.tensor([-5.0, 5.0, 0.004, -0.004]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = denormalize_to_uint8(x, "half")
    assert out.shape == (1, 1, 4, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 127]


def test_normalization_input_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="floating point"):
        normalize(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "imagenet21k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        denormalize_to_uint8(torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="floating point"):
        denormalize_to_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- PNG out


def test_to_png_bytes_round_trip() -> None:
    arr = np.asarray(noise(33, 17))
    data = to_png_bytes(arr)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), arr)
    # Non-contiguous views are fine too.
    np.testing.assert_array_equal(np.asarray(load_image(to_png_bytes(arr[:, ::-1]))), arr[:, ::-1])


def test_to_png_bytes_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        to_png_bytes(np.zeros((4, 4, 3), np.float32))
