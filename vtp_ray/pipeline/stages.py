"""The torch-free pieces of a pipeline: the preprocess stage every source's read ends with, how many inputs a block
holds, and the Arrow <-> numpy views the model stage uses.

Rows travel as Arrow tables. After the preprocess stage a row is ``path, label, width, height, image, reason,
error``: ``image`` is the preprocessed ``size x size x 3`` uint8 pixels as one fixed-size binary value, or null with
``reason`` / ``error`` saying why the input could not become an image. This module never imports torch: Ray Data
runs the stage in plain CPU worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..images import ImageLoadError
from .spec import PipelineSpec, Preprocessing

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "BLOCKS_PER_SLOT",
    "BLOCK_BYTES",
    "NoImage",
    "Refused",
    "block_rows",
    "fixed_size_lists",
    "nullable_floats",
    "numbered_blocks",
    "pixels",
    "preprocess_images",
    "valid_rows",
]

#: Pixels per block by default. Ray Data costs tens of ms per task and per actor call whatever the block holds, so
#: a block carries many model batches; 32 MB is a quarter of Ray Data's target block size (1,280 images at 64 px,
#: 160 at 256 px, a second or more of preprocessing either way).
BLOCK_BYTES = 32 * 2**20
#: Blocks per preprocess slot at least, so that preprocessing and the model overlap and the last block is a short
#: tail.
BLOCKS_PER_SLOT = 4


def block_rows(spec: PipelineSpec, inputs: int, cpus: float) -> int:
    """Inputs per block: ``spec.block_size``, else about ``BLOCK_BYTES`` of pixels, whole model batches, and at
    least ``BLOCKS_PER_SLOT`` blocks per preprocess slot (``spec.preprocess_slots``: ``cpus / preprocess_cpus``,
    within the job's bound on an app) when there are enough inputs (``inputs``: how many the source holds,
    ``sys.maxsize`` when it is streamed and not counted).

    The slots are the tasks that actually run at once: a job on an app runs one preprocess task on a small
    cluster, and blocks sized for eight made it pay Ray Data's per-block cost (tasks, handle calls, about 0.1 s a
    block on 2 cores) eight times over.
    """
    if spec.block_size:
        return spec.block_size
    slots = spec.preprocess_slots(cpus)
    rows = min(BLOCK_BYTES // (3 * spec.preprocessing.size**2), math.ceil(inputs / (BLOCKS_PER_SLOT * slots)))
    return max(1, math.ceil(rows / spec.batch_size)) * spec.batch_size


def numbered_blocks(count: int, per_block: int = 1) -> Dataset:
    """The numbers ``0 .. count - 1`` (column ``id``) in blocks of ``per_block`` consecutive numbers (the last one
    may hold fewer): what a source's read maps its read + preprocess function over, one task per block.

    Made on the driver, not by ``ray.data.range``: range's read tasks ask for a whole CPU each, which on a small
    machine left room for one preprocess task beside the model actor (2 cores: decoding, the bottleneck, ran one
    block at a time).
    """
    import ray.data

    blocks = max(-(-count // per_block), 1)
    return ray.data.from_items([{"id": i} for i in range(count)], override_num_blocks=blocks)


class Refused(Exception):
    """An input refused before loading: its error row gets the class's ``reason`` and the exception's message."""

    reason = "refused"


class NoImage(Refused):
    """An input that holds no image to load (e.g. a sample without an image member): its error row's message."""

    reason = "no_image"


def preprocess_images(n: int, fetch: Callable[[int], bytes], preprocessing: Preprocessing) -> pa.Table:
    """Load and crop the encoded images ``fetch(0) .. fetch(n - 1)``: columns ``width, height, image, reason,
    error``, one row each. An input that cannot be fetched or loaded becomes a row with a null image and its
    reason: it never raises, so one bad input cannot fail the job. The images are written straight into one buffer
    that becomes the ``image`` column without a copy.
    """
    size = preprocessing.size
    pixels_out = np.zeros((n, size, size, 3), np.uint8)
    ok = np.zeros(n, bool)
    widths = np.zeros(n, np.int32)
    heights = np.zeros(n, np.int32)
    reasons: list[str | None] = [None] * n
    messages: list[str | None] = [None] * n
    for i in range(n):
        try:
            pixels_out[i], (widths[i], heights[i]) = preprocessing.apply(fetch(i))
            ok[i] = True
        except Refused as e:
            reasons[i], messages[i] = e.reason, str(e)
        except ImageLoadError as e:
            reasons[i], messages[i] = e.reason, str(e)
        except OSError as e:  # missing, unreadable, or a storage error
            reasons[i], messages[i] = "unreadable", f"cannot read the file: {e}"
        except MemoryError:
            raise  # this worker's problem, not the input's: let Ray retry the task
        except Exception as e:
            reasons[i], messages[i] = "unexpected", f"{type(e).__name__}: {e}"
    validity = None if ok.all() else pa.array(ok).buffers()[1]
    images = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(size * size * 3), n, [validity, pa.py_buffer(pixels_out)], null_count=int(n - ok.sum())
    )
    return pa.table(
        {
            "width": pa.array(widths, pa.int32(), mask=~ok),
            "height": pa.array(heights, pa.int32(), mask=~ok),
            "image": images,
            "reason": pa.array(reasons, pa.string()),
            "error": pa.array(messages, pa.string()),
        }
    )


# ------------------------------------------------------------------------------------------ Arrow views


def valid_rows(batch: pa.Table) -> np.ndarray:
    """Boolean mask of the rows that hold an image (no error)."""
    return batch.column("error").is_null().to_numpy(zero_copy_only=False)


def pixels(images: pa.FixedSizeBinaryArray | pa.ChunkedArray, size: int) -> np.ndarray:
    """The images of a fixed-size binary column as one writable uint8 ``(N, size, size, 3)`` array.

    The column is one contiguous buffer: it is viewed as ``(N, H, W, 3)`` and copied once (torch wants a writable
    array). Null entries must have been filtered out.
    """
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    width = size * size * 3
    view = np.frombuffer(images.buffers()[1], np.uint8, len(images) * width, images.offset * width)
    return view.reshape(len(images), size, size, 3).copy()


def fixed_size_lists(
    values: np.ndarray | None, valid: np.ndarray, dtype: pa.DataType, shape: tuple[int, ...]
) -> pa.Array:
    """Per-valid-row ``(n_valid, *shape)`` values -> a ``len(valid)`` long ``fixed_size_list<dtype>`` column, null
    where not valid (all null when ``values`` is None)."""
    k = int(np.prod(shape))
    full = np.zeros((len(valid), k), dtype=dtype.to_pandas_dtype())
    if values is not None:
        full[valid] = values.reshape(len(values), k)
    mask = ~valid if values is not None else np.ones(len(valid), bool)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), dtype), k, mask=pa.array(mask))


def nullable_floats(values: np.ndarray | None, valid: np.ndarray) -> pa.Array:
    """Per-valid-row float64 values -> a full-length column, null for error rows (all null when ``values`` is None)."""
    full = np.zeros(len(valid), np.float64)
    if values is not None:
        full[valid] = values
    return pa.array(full, pa.float64(), mask=~valid if values is not None else np.ones(len(valid), bool))
