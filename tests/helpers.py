"""Helpers the test modules share (fixtures live in ``conftest.py``): paths, images, HTTP, polling, subprocesses."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = str(FIXTURES / "vtp-tiny")
TINYTEXT = str(FIXTURES / "vtp-tinytext")  # the real 49408-id vocabulary and context 77
TOKENS = FIXTURES / "text-tokens" / "tokens.json"  # upstream tokenizer ids of 20 texts
SIZE = 64  # the tiny model's training size
CHANNELS = 8  # the tiny model's latent channels
NPY = "application/x-npy"


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_image(height: int = 80, width: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def model_inputs(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """``n`` random images as the model takes them: PNG-encoded, then preprocessed, uint8 ``(n, size, size, 3)``."""
    from vtp_ray.images import preprocess

    return np.stack([preprocess(png_bytes(random_image(seed=seed + i)), size=size) for i in range(n)])


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def _post_all(base_url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(*(client.post(**kwargs) for kwargs in requests))


def post_concurrently(base_url: str, requests: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send all ``requests`` (``httpx.AsyncClient.post`` kwargs) at once."""
    return asyncio.run(_post_all(base_url, requests))


def replicas_seen(client: httpx.Client, want: int, exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Ask /v1/model until ``want`` different live replicas (not in ``exclude``) have answered."""
    seen: dict[str, dict[str, Any]] = {}

    def enough() -> bool:
        for _ in range(10):
            response = client.get("/v1/model")
            info = response.json()["replica"] if response.status_code == 200 else None
            if info and info["id"] not in exclude:
                seen[info["id"]] = info
        return len(seen) >= want

    wait_until(enough, timeout_s=60, what=f"{want} replicas answering /v1/model")
    return seen


def start_tokenize_cli(args: list[str], **popen: Any) -> subprocess.Popen:
    """``vtp-ray tokenize ARGS`` in a process of its own (a driver that can be killed or outlive a node)."""
    command = [sys.executable, "-m", "vtp_ray.cli", "tokenize", *args]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen)


def wait_for_parts(output: Path, count: int, process: subprocess.Popen) -> None:
    """Until ``output`` holds ``count`` data parts; fails if the job ends first or takes over two minutes."""
    deadline = time.monotonic() + 120
    while len(list((output / "data").glob("part-*.parquet"))) < count:
        assert process.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, f"fewer than {count} parts written in time"
        time.sleep(0.02)


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _add_tar_member(tar: Any, name: str, data: bytes) -> None:
    """Append ``data`` as a regular member ``name`` to an open ``tarfile`` (as webdataset writers do)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar of ``name -> data`` regular members, in the given order (a webdataset shard when names are KEY.EXT)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            _add_tar_member(tar, name, data)


def sample_images(count: int = 6) -> dict[str, bytes]:
    """Sample key -> encoded image bytes (JPEG and PNG, several sizes)."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(count):
        array = rng.integers(0, 256, (48 + 8 * i, 80 - 4 * i, 3), dtype=np.uint8)
        out[f"{i:09d}"] = jpeg_bytes(array) if i % 2 else png_bytes(array)
    return out


def write_parquet(path: Path, images: dict[str, bytes], hub: bool = False) -> None:
    """img2dataset's parquet layout (``key``, ``jpg`` bytes, ``caption``) or the hub's ``{"bytes", "path"}`` struct."""
    keys = sorted(images)
    if hub:
        structs = [{"bytes": images[k], "path": f"{k}.img"} for k in keys] + [{"bytes": None, "path": "missing.img"}]
        table = pa.table({"image": pa.array(structs), "label": [int(k) % 3 for k in keys] + [0]})
    else:
        table = pa.table({"key": keys, "jpg": [images[k] for k in keys], "caption": [f"caption {k}" for k in keys]})
    pq.write_table(table, path, row_group_size=2)


def write_shards(root: Path, images: dict[str, bytes]) -> dict[str, str | None]:
    """img2dataset's webdataset layout: two shards of ``KEY.jpg|png + .json + .txt + .cls`` members, broken
    samples, and the sidecar ``.parquet`` / ``_stats.json`` files. -> {identity: expected error reason or None}."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    keys = sorted(images)
    half = len(keys) // 2
    for shard, chunk in enumerate((keys[:half], keys[half:])):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in chunk:
                ext = "png" if images[key].startswith(b"\x89PNG") else "jpg"
                _add_tar_member(tar, f"{key}.{ext}", images[key])
                _add_tar_member(tar, f"{key}.json", json.dumps({"key": key, "label": f"j{key[-1]}"}).encode())
                _add_tar_member(tar, f"{key}.txt", f"caption {key}".encode())
                _add_tar_member(tar, f"{key}.cls", str(int(key) % 3).encode())
                expected[f"{path}#{key}"] = None
            if shard == 0:
                _add_tar_member(tar, "broken.jpg", b"\xff\xd8 not a jpeg")  # a broken image member
                _add_tar_member(tar, "pickled.pkl", b"\x80\x04\x95 never unpickled")  # no image member at all
                _add_tar_member(tar, "pickled.txt", b"caption")
                expected[f"{path}#broken"] = "not_an_image"
                expected[f"{path}#pickled"] = "no_image"
        pq.write_table(pa.table({"key": chunk, "status": ["success"] * len(chunk)}), root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text("{}")
    return expected


#: ``rate_limits`` for apps whose tests send many requests from one address and are not about rate limits
#: (tests/test_ratelimits.py is): no budget on either kind of route.
UNLIMITED = {"model": {"rate": 0}, "cheap": {"rate": 0}}
