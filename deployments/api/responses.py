"""How ``/v1`` answers: images as PNG, .npy, zip or multipart; the headers that say how a request was served
(``x-vtp-batch-size``, ``Server-Timing``)."""

from __future__ import annotations

import contextlib
import io
import time
import uuid
import zipfile
from collections.abc import Iterator

import numpy as np

from vtp_ray.images import to_png_bytes

from ..model.protocol import Outcome

__all__ = [
    "BATCH_SIZE_HEADER",
    "LABEL_CACHE_HEADER",
    "MULTIPART",
    "NPY_MEDIA_TYPE",
    "ZIP",
    "encode_images",
    "served_headers",
    "slowest",
    "timed",
]

NPY_MEDIA_TYPE = "application/x-npy"
ZIP = "application/zip"
MULTIPART = "multipart/mixed"
BATCH_SIZE_HEADER = "x-vtp-batch-size"
LABEL_CACHE_HEADER = "x-vtp-label-cache"  # hit: the label set's text embeddings were cached on the replica

#: Server-Timing stages, in the order a request goes through them.
STAGES = ("read", "preprocess", "input", "hop", "queue", "model", "output")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time (ms) as the Server-Timing stage ``name``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = (time.perf_counter() - started) * 1000


def slowest(outcomes: list[Outcome]) -> Outcome:
    """What a many-input request reports: its largest model call and its longest queue and model times."""
    return Outcome(
        None,
        max(o.batch_size for o in outcomes),
        max(o.queue_ms for o in outcomes),
        max(o.model_ms for o in outcomes),
    )


def served_headers(outcome: Outcome | None, timings: dict[str, float]) -> dict[str, str]:
    """``x-vtp-batch-size`` (with a model call), and a ``Server-Timing`` header saying where the request's time went
    (ms): ``read`` (the body), ``preprocess`` (load + crop), ``input`` (parsing), ``hop`` (serialization and
    Serve's hops), ``queue`` and ``model`` (in the replica), ``output`` (encoding the answer)."""
    stages = dict(timings)
    headers = {}
    if outcome is not None:
        stages.update(queue=outcome.queue_ms, model=outcome.model_ms)
        headers[BATCH_SIZE_HEADER] = str(outcome.batch_size)
        if "call" in stages:  # the handle round trip, less the replica's own time
            stages["hop"] = max(stages.pop("call") - outcome.queue_ms - outcome.model_ms, 0.0)
    ordered = (name for name in STAGES if name in stages)
    headers["server-timing"] = ", ".join(f"{name};dur={stages[name]:.1f}" for name in ordered)
    return headers


def encode_images(images: list[np.ndarray], kind: str) -> tuple[bytes, str]:
    """uint8 ``(H, W, 3)`` images -> ``(body, media type)``: one .npy, a zip or a multipart/mixed of PNGs named
    ``00000.png``... in input order. CPU work: call it off the event loop."""
    if kind == NPY_MEDIA_TYPE:
        buffer = io.BytesIO()
        np.save(buffer, np.stack(images), allow_pickle=False)
        return buffer.getvalue(), NPY_MEDIA_TYPE
    pngs = [(f"{i:05d}.png", to_png_bytes(image)) for i, image in enumerate(images)]
    if kind == ZIP:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for name, png in pngs:
                archive.writestr(name, png)
        return buffer.getvalue(), ZIP
    boundary = uuid.uuid4().hex
    head = '--{}\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename="{}"\r\n\r\n'
    parts = [head.format(boundary, name).encode() + png + b"\r\n" for name, png in pngs]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"{MULTIPART}; boundary={boundary}"
