"""Image I/O and preprocessing for the visual tokenizer service.

Data path: encoded bytes or a file path -> ``load_image`` (file bytes -> pixels is *loading*, never "decoding",
which in this project means latents -> pixels; size limits, first frame, EXIF orientation,
any mode flattened to RGB) -> ``center_crop_adm`` / ``resize_plain`` -> uint8 ``(H, W, 3)`` numpy array
(``preprocess``). On the model side, batches of those arrays become torch tensors and ``normalize.normalize``
is the single place where they turn into float ``(N, 3, H, W)``; ``normalize.denormalize_to_uint8`` and
``to_png_bytes`` go back the other way for reconstructions. This module never imports torch: Ray Data's
preprocess tasks import it in processes of their own.
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "NORMALIZATIONS",
    "PATCH_SIZE",
    "CropMode",
    "ImageLimits",
    "ImageLoadError",
    "ImageSource",
    "LoadErrorReason",
    "Normalization",
    "NormalizationKind",
    "center_crop_adm",
    "load_image",
    "preprocess",
    "preprocess_with_info",
    "resize_plain",
    "resolve_normalization",
    "to_png_bytes",
    "to_rgb",
]

ImageSource: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]
CropMode = Literal["center", "resize"]
NormalizationKind = Literal["imagenet", "half"]
LoadErrorReason = Literal["empty", "too_large_bytes", "too_many_pixels", "truncated", "not_an_image", "unsupported"]

#: The model's patch size; ``preprocess`` only produces square sides that are a multiple of it.
PATCH_SIZE = 16

_WHITE = (255, 255, 255)
# Modes with an alpha channel (straight or premultiplied); they are composited over white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# Modes whose colour-key transparency (``info["transparency"]``) Pillow can expand into an alpha channel.
_COLOR_KEY_MODES = frozenset({"L", "P", "RGB"})
# Pillow decodes EPS by running Ghostscript in a subprocess; untrusted uploads must never reach it.
_REFUSED_FORMATS = frozenset({"EPS"})
_EPS_MAGIC = (b"%!PS", b"\xc5\xd0\xd3\xc6")


class ImageLoadError(ValueError):
    """Raised for any input that cannot become an image.

    ``reason`` is a short machine-readable code (see ``LoadErrorReason``); ``str(err)`` is the human
    message.
    """

    def __init__(self, reason: LoadErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: LoadErrorReason = reason

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[LoadErrorReason, str]]:
        # Keeps the error picklable (Ray ships exceptions between processes); the default reduce would
        # call __init__ with the message only.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class ImageLimits:
    """Per-call limits that protect the decoder from oversized inputs.

    ``max_pixels`` defaults to Pillow's own ``Image.MAX_IMAGE_PIXELS`` (about 0.25 GiB at 24 bpp) but is
    enforced here, per call, from the image header and before any pixel data is decoded.
    """

    max_bytes: int = 64 * 2**20
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive int, got {value!r}")


_DEFAULT_LIMITS = ImageLimits()


# ---------------------------------------------------------------------------------------------- loading


def load_image(src: ImageSource, limits: ImageLimits = _DEFAULT_LIMITS) -> Image.Image:
    """Load encoded image bytes, or the file at a path, into an RGB ``PIL.Image.Image``.

    Takes the first frame of animated images, applies the EXIF orientation and flattens every mode to RGB
    (see ``to_rgb``). Every input that cannot become an image raises ``ImageLoadError``. A ``str`` is a
    filesystem path, never image data; filesystem errors while reading a path (``FileNotFoundError``,
    ``PermissionError``, ...) propagate unchanged because they are the caller's problem, not the input's.
    """
    return _load(src, limits)[0]


def _load(
    src: ImageSource, limits: ImageLimits, draft_short_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image``, plus the displayed ``(width, height)`` of the full-size image.

    With ``draft_short_side``, a JPEG is decoded at the largest reduced scale (1/2, 1/4, 1/8: Pillow's draft
    mode, libjpeg's DCT scaling) whose short side is still at least that many pixels.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data: bytes | bytearray | memoryview = src
        _check_byte_size(memoryview(src).nbytes, limits)
    elif isinstance(src, (str, os.PathLike)):
        data = _read_limited(os.fspath(src), limits)
    else:
        raise TypeError(f"expected image bytes or a path, got {type(src).__name__}")
    return _load_bytes(data, limits, draft_short_side)


def _check_byte_size(n_bytes: int, limits: ImageLimits) -> None:
    if n_bytes == 0:
        raise ImageLoadError("empty", "image data is empty")
    if n_bytes > limits.max_bytes:
        raise ImageLoadError(
            "too_large_bytes",
            f"image is {n_bytes} bytes, over the limit of {limits.max_bytes} (set max_bytes to raise it)",
        )


def _read_limited(path: str, limits: ImageLimits) -> bytes:
    _check_byte_size(os.path.getsize(path), limits)
    with open(path, "rb") as f:
        # Read at most one byte past the limit: the file may have grown since getsize().
        data = f.read(limits.max_bytes + 1)
    _check_byte_size(len(data), limits)
    return data


def _load_bytes(
    data: bytes | bytearray | memoryview, limits: ImageLimits, draft_short_side: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    try:
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except UnidentifiedImageError as e:
        if bytes(data[:4]) in _EPS_MAGIC:
            raise ImageLoadError("unsupported", "EPS/PostScript images are not accepted") from e
        raise ImageLoadError("not_an_image", "data is not an image in any supported format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow checks its process-wide Image.MAX_IMAGE_PIXELS inside open(), before our own check can run
        # (the warning only arrives here as an exception when warnings are turned into errors).
        raise ImageLoadError(
            "too_many_pixels",
            f"image has too many pixels to decode safely: {e} "
            "(Pillow's process-wide Image.MAX_IMAGE_PIXELS applies on top of max_pixels)",
        ) from e
    except MemoryError:
        raise  # a resource problem on this side, not a bad input
    except Exception as e:
        raise _pillow_error(e, "cannot read image header") from e

    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            "too_many_pixels",
            f"image has {width * height} pixels ({width}x{height}), over the limit of {limits.max_pixels} "
            "(set max_pixels to raise it)",
        )

    drafted = None
    try:
        if draft_short_side and img.format == "JPEG":
            # Pillow picks the largest scale s in (8, 4, 2, 1) with s <= min(width // w, height // h).
            img.draft("RGB", (draft_short_side, draft_short_side))
            drafted = img.size
        img.seek(0)  # first frame of animated GIF / WebP / APNG
        img.load()
    except MemoryError:
        raise
    except Exception as e:
        raise _pillow_error(e, f"cannot decode {img.format} image") from e

    _apply_exif_orientation(img)
    # As displayed: the full-size image turned as the EXIF orientation turned the decoded one.
    turned = drafted is not None and img.size != drafted
    full_size = img.size if drafted is None else (height, width) if turned else (width, height)
    try:
        if img.mode == "I" and img.format == "PNG":
            # PNG has no 32-bit mode: this is 16-bit grayscale, which Pillow < 10.3 opens as "I", not "I;16".
            return _gray16_to_rgb(img), full_size
        return to_rgb(img), full_size
    except MemoryError:
        raise
    except Exception as e:
        raise _pillow_error(e, f"cannot convert {img.format} image in mode {img.mode} to RGB") from e


def _allowed_formats() -> list[str]:
    Image.init()  # registers all plugins; a cheap no-op after the first call
    return [fmt for fmt in Image.ID if fmt not in _REFUSED_FORMATS]


def _pillow_error(e: Exception, what: str) -> ImageLoadError:
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return ImageLoadError("truncated", f"{what}: image data is truncated ({e})")
    return ImageLoadError("unsupported", f"{what}: {type(e).__name__}: {e}")


def _apply_exif_orientation(img: Image.Image) -> None:
    # Malformed EXIF metadata does not make the pixels unusable: keep the stored orientation, as image
    # viewers do. In place, so nothing is copied when there is nothing to rotate.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB, deterministically.

    * Alpha (RGBA, LA, PA, premultiplied RGBa, and P / L / RGB with colour-key transparency) is composited
      over an opaque white background, the usual convention for documents and web images.
    * 16-bit grayscale (``I;16*``) is scaled to 8 bits with ``round(v / 257)``, so 0 -> 0 and 65535 -> 255.
    * 32-bit ``I`` and ``F`` are clipped to 0..255 (``F`` is truncated towards zero), exactly as Pillow's
      ``convert`` does; such images are assumed to already be in 8-bit range.
    * Everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX, ...) goes through Pillow's ``convert("RGB")``.

    Returns ``img`` itself when it is already plain RGB.
    """
    mode = img.mode
    has_color_key = mode in _COLOR_KEY_MODES and "transparency" in img.info
    if mode == "RGB" and not has_color_key:
        return img
    if mode.startswith("I;16"):
        return _gray16_to_rgb(img)
    if mode in _ALPHA_MODES or has_color_key:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba)  # the RGBA image's alpha band is the mask
        return out
    return img.convert("RGB")


def _gray16_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grayscale (any ``I;16*`` mode, or ``I`` holding 16-bit values) -> RGB via ``round(v / 257)``."""
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    gray = ((values + 128) // 257).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# ---------------------------------------------------------------------------------------- preprocessing


def _check_positive_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM (guided-diffusion) center crop to ``size x size``, as used for the model's published numbers.

    Halve with a box filter while the short side is at least ``2 * size``, bicubic-resize so the short side
    is ``size``, then crop the center.
    """
    _check_positive_size(size)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    width, height = img.size
    top = (height - size) // 2
    left = (width - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_plain(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to ``size x size``, ignoring the aspect ratio (the ``"resize"`` crop mode)."""
    _check_positive_size(size)
    return img.resize((size, size), resample=Image.Resampling.BICUBIC)


def preprocess_with_info(
    src: ImageSource | Image.Image | np.ndarray,
    size: int = 256,
    crop: CropMode = "center",
    limits: ImageLimits = _DEFAULT_LIMITS,
    draft: bool = False,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like ``preprocess``, but also return the original ``(width, height)`` before cropping.

    For loaded inputs the original size is taken after the EXIF orientation is applied, i.e. as displayed (also
    with ``draft``: it is the full-size image's).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ValueError(f"size must be a positive multiple of the patch size {PATCH_SIZE}, got {size!r}")
    if crop not in ("center", "resize"):
        raise ValueError(f"crop must be 'center' or 'resize', got {crop!r}")

    if isinstance(src, Image.Image):
        img = to_rgb(src)
        orig_size = img.size
    elif isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise ValueError(f"array input must be uint8 of shape (H, W, 3), got {src.dtype} {src.shape}")
        img = Image.fromarray(src)
        orig_size = img.size
    else:
        # The center crop halves while the short side is >= 2 * size: a JPEG decoded at a reduced scale that
        # keeps it there replaces some of those halvings (not the last one); "resize" has no halvings to replace.
        img, orig_size = _load(src, limits, 2 * size if draft and crop == "center" else None)
    img = center_crop_adm(img, size) if crop == "center" else resize_plain(img, size)
    # np.array (not asarray) gives a writable, C-contiguous array that owns its memory.
    arr = np.array(img, dtype=np.uint8)
    return arr, orig_size


def preprocess(
    src: ImageSource | Image.Image | np.ndarray,
    size: int = 256,
    crop: CropMode = "center",
    limits: ImageLimits = _DEFAULT_LIMITS,
    draft: bool = False,
) -> np.ndarray:
    """Load (if needed), crop and return a C-contiguous uint8 array of shape ``(size, size, 3)``.

    ``src`` is encoded bytes, a path (see ``load_image``), a ``PIL.Image.Image`` (converted with
    ``to_rgb``; its EXIF orientation is not applied, as the caller already loaded it) or a uint8
    ``(H, W, 3)`` RGB array. ``size`` must be a positive multiple of ``PATCH_SIZE``.

    ``draft=True`` (center crop, JPEG bytes or paths only) decodes the JPEG at the largest reduced scale (1/2,
    1/4, 1/8, libjpeg's DCT scaling) whose short side stays >= ``2 * size``, instead of decoding every pixel and
    box-halving: several times faster on large photos, but not the exact ADM pixels (docs/results.md has the
    measured difference). The default is the exact ADM path the published numbers use.
    """
    return preprocess_with_info(src, size, crop, limits, draft)[0]


def to_png_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 ``(H, W, 3)`` RGB array as PNG, fast: zlib level 1 with its run-length strategy."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    # Z_RLE after PNG's row filters: ~25% faster than level 1's default strategy on photos (256 px: 4.3 against
    # 5.7 ms here) and ~5% smaller, as small as level 6 (12 ms); long matches are rare in filtered photo rows.
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- normalization


@dataclass(frozen=True)
class Normalization:
    """Per-channel (R, G, B) mean and std applied to pixel values in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


NORMALIZATIONS: Mapping[str, Normalization] = MappingProxyType(
    {
        "imagenet": Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        "half": Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    }
)


def resolve_normalization(kind: NormalizationKind | str | Normalization) -> Normalization:
    """A ``Normalization`` from its name (``imagenet``, ``half``), or the one given."""
    if isinstance(kind, Normalization):
        return kind
    try:
        return NORMALIZATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown normalization {kind!r}; expected one of {sorted(NORMALIZATIONS)}") from None


# Deprecated names (before "decode" came to mean latents -> pixels only); kept so that existing imports work.
DecodeLimits = ImageLimits
ImageDecodeError = ImageLoadError
decode_image = load_image
