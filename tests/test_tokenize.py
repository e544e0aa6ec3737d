"""``tokenize_dataset`` end to end on a real local Ray cluster: real files in, parquet read back with pyarrow.

One cluster for the module, started with ``resources={"NPU": 2}`` so that the default placement pins each replica
to an NPU (the replicas compute on the CPU: ``device="cpu"``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, start_tokenize_cli, wait_for_parts
from PIL import Image

from vtp_ray import VTPReplica
from vtp_ray.cpu_threads import node_cores
from vtp_ray.images import ImageLimits, preprocess, preprocess_with_info
from vtp_ray.pipeline import PipelineSpec, Preprocessing, ReplicaStartError
from vtp_ray.pipeline.jobs.tokenize import TokenizeWorker, tokenize_dataset
from vtp_ray.pipeline.sources.files import preprocess_rows
from vtp_ray.pipeline.store import METADATA_KEY, OutputMismatchError
from vtp_ray.placement import PlacementError

pytestmark = pytest.mark.slow

SIZE = 64
LIMITS = ImageLimits(max_pixels=50_000)
PREPROCESSING = Preprocessing(SIZE, limits=LIMITS)
SHAPE = (8, SIZE // 16, SIZE // 16)


def _noise(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels) if channels > 1 else (height, width), dtype=np.uint8)


def make_tree(root: Path) -> dict[str, str | None]:
    """Images of many modes and sizes, broken files and ignored files; -> {path: expected error reason or None}."""
    rng = np.random.default_rng(0)
    expected: dict[str, str | None] = {}

    def save(rel: str, image: Image.Image, reason: str | None = None, **params) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **params)
        expected[str(path)] = reason

    save("cat/rgb.jpg", Image.fromarray(_noise(rng, 72, 96)), quality=95)
    save("cat/rgba.png", Image.fromarray(_noise(rng, 96, 64, 4), "RGBA"))
    save("cat/nested/deep/gray.png", Image.fromarray(_noise(rng, 80, 100, 1), "L"))
    save("cat/palette.gif", Image.fromarray(_noise(rng, 50, 70)).convert("P"))
    save("dog/wide.jpg", Image.fromarray(_noise(rng, 90, 200)))
    save("dog/gray16.png", Image.fromarray(rng.integers(0, 65536, (60, 50), dtype=np.uint16)))
    save("dog/cmyk.jpg", Image.fromarray(_noise(rng, 80, 80)).convert("CMYK"))
    save("dog/small.bmp", Image.fromarray(_noise(rng, 30, 20)))
    save("top.webp", Image.fromarray(_noise(rng, 64, 64)))
    save("dog/huge.png", Image.new("RGB", (300, 300)), "too_many_pixels")  # over LIMITS.max_pixels

    jpeg = io.BytesIO()
    Image.fromarray(_noise(rng, 64, 64)).save(jpeg, format="JPEG")
    broken = {"cat/truncated.jpg": (jpeg.getvalue()[:600], "truncated"), "cat/empty.jpg": (b"", "empty")}
    broken["dog/text.jpg"] = (b"this is not a picture\n", "not_an_image")
    for rel, (data, reason) in broken.items():
        (root / rel).write_bytes(data)
        expected[str(root / rel)] = reason

    (root / ".hidden").mkdir()
    Image.new("RGB", (32, 32)).save(root / ".hidden" / "skipped.jpg")
    (root / "dog" / "readme.md").write_text("not an input")
    return expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("images")
    return root, make_tree(root)


@pytest.fixture(scope="module")
def replica(tiny_dir) -> VTPReplica:
    return VTPReplica(str(tiny_dir), device="cpu", warmup_size=SIZE)


def _spec(tiny_dir: Path, **changes) -> PipelineSpec:
    spec = PipelineSpec(
        str(tiny_dir), device="cpu", preprocessing=PREPROCESSING, batch_size=2, labels_from_dirs=True, progress=False
    )
    return replace(spec, **changes)


JOB = {"rows_per_file": 4, "flip": True}


@pytest.fixture(scope="module")
def job(ray_runtime, tree, tiny_dir, tmp_path_factory):
    """One run with the default placement (auto: NPU here) and the default pool (one replica per NPU)."""
    root, _ = tree
    output = tmp_path_factory.mktemp("job") / "out"
    summary = tokenize_dataset(str(root), str(output), _spec(tiny_dir), **JOB)
    return output, summary


def _rows(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "data").set_index("path").sort_index()


def _array(column) -> np.ndarray:
    return np.stack([np.asarray(v) for v in column]).reshape(-1, *SHAPE)


# ------------------------------------------------------------------------------------------- counts


def test_every_input_ends_as_exactly_one_row_or_one_error(job, tree):
    output, summary = job
    _, expected = tree
    rows = pq.read_table(output / "data", columns=["path"]).column("path").to_pylist()
    errors = pq.read_table(output / "errors.parquet").to_pylist()
    assert len(rows) == len(set(rows)) and {e["path"] for e in errors}.isdisjoint(rows)
    assert len(rows) + len(errors) == len(expected) == summary.inputs == 13
    assert sorted(rows) == sorted(p for p, reason in expected.items() if reason is None)
    assert {e["path"]: e["reason"] for e in errors} == {p: r for p, r in expected.items() if r}
    assert all(e["error"] for e in errors)
    assert (summary.rows, summary.errors, summary.skipped, summary.processed, summary.missing) == (9, 4, 0, 13, 0)


def test_the_schema_holds_flat_latents_and_the_manifest_says_what_made_them(job, replica):
    output, _ = job
    parts = sorted((output / "data").glob("part-*.parquet"))
    assert len(parts) >= 3  # rows_per_file=4
    schema = pq.read_schema(parts[0])
    assert schema.names == ["path", "label", "width", "height", "latents", "latents_flip", "clip_embedding"]
    assert schema.field("latents").type == pa.list_(pa.field("element", pa.float32(), False), 128)
    assert json.loads(schema.field("latents").metadata[b"shape"]) == list(SHAPE)
    assert schema.field("clip_embedding").type.list_size == 64 and schema.field("label").nullable

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["model"]["config_digest"] == replica.info.config_digest
    assert manifest["model"]["random_weights"] is False and manifest["model"]["name"] == "vtp-tiny"
    assert (manifest["precision"], manifest["device"], manifest["vtp_ray_version"]) == ("fp32", "cpu", "0.1.0")
    assert manifest["preprocessing"]["size"] == SIZE and manifest["preprocessing"]["crop"] == "center"
    assert manifest["preprocessing"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    in_file = json.loads(schema.metadata[METADATA_KEY])
    assert in_file["model"] == manifest["model"] and in_file["run"]["replica_pool"] == 2


def test_plain_pandas_rows_become_numpy_arrays_of_the_right_shape(job, tree):
    output, _ = job
    root, _ = tree
    df = pd.read_parquet(output / "data")
    row = df.iloc[0]
    latents = np.asarray(row["latents"], dtype=np.float32).reshape(SHAPE)  # docs/datasets.md's one-liner
    assert latents.shape == SHAPE and np.isfinite(latents).all()
    labels = dict(zip(df["path"], df["label"], strict=True))
    assert labels[str(root / "cat/nested/deep/gray.png")] == "cat" and labels[str(root / "dog/wide.jpg")] == "dog"
    assert pd.isna(labels[str(root / "top.webp")])
    sizes = {p: (w, h) for p, w, h in zip(df["path"], df["width"], df["height"], strict=True)}
    assert sizes[str(root / "dog/wide.jpg")] == (200, 90) and sizes[str(root / "dog/small.bmp")] == (20, 30)


# docs/datasets.md, "Reading it for training": its first block, word for word (OUT stands for the output directory). A
# newcomer saw it end in "terminate called without an active exception" (rc 134) at interpreter exit in 6 of 20 runs,
# with pandas 2.3.3 and pyarrow 26: it must exit cleanly every time, so it runs in fresh interpreters, many times.
_SECTION = (ROOT / "docs" / "datasets.md").read_text().split("## Reading it for training", 1)[1]
READING_FOR_TRAINING = _SECTION.split("```python\n", 1)[1].split("```", 1)[0]
FRESH_RUNS = 24


@pytest.mark.soak  # 24 interpreters; tests/test_docs.py runs the block once in CI
def test_the_documented_pandas_reader_exits_cleanly_in_fresh_interpreters(job, tmp_path):
    output, _ = job
    snippet = READING_FOR_TRAINING.replace("OUT", str(output))
    saved = tmp_path / "x.npy"
    # every run is the block as written, but one, which also saves what it read
    scripts = [snippet + f"np.save({str(saved)!r}, x)\n"] + [snippet] * (FRESH_RUNS - 1)

    def run(script: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # an abort then shows every thread's Python stack
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, scripts))
    failed = [(r.returncode, r.stderr[-500:]) for r in results if r.returncode != 0 or r.stderr]
    assert not failed, f"{len(failed)} of {FRESH_RUNS} runs failed: {failed[0]}"
    table = pq.read_table(output / "data")
    expected = table["latents"].combine_chunks().flatten().to_numpy().reshape(-1, *SHAPE)[0]
    assert np.array_equal(np.load(saved), expected)  # the same stored floats, read two ways


def test_latents_are_the_replicas_on_the_same_preprocessed_image(job, replica):
    output, _ = job
    rows = _rows(output)
    images = np.stack([preprocess(path, SIZE, "center") for path in rows.index])
    expected = replica.encode(images)
    flipped = replica.encode(np.ascontiguousarray(images[:, :, ::-1]))
    embeddings = np.stack([np.asarray(v) for v in rows["clip_embedding"]])
    # The pipeline's batches are composed differently, and GEMM blocking (so float rounding) depends on the batch
    # size and the CPU: equal up to a few float32 ulps, not bit for bit.
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(_array(rows["latents"]), expected.latents, **close)
    np.testing.assert_allclose(_array(rows["latents_flip"]), flipped.latents, **close)
    np.testing.assert_allclose(embeddings, expected.clip_embedding, **close)


def _check_stats(output: Path) -> dict:
    stats = json.loads((output / "stats.json").read_text())
    table = pq.read_table(output / "data", columns=["latents"])
    latents = table.column("latents").combine_chunks().flatten().to_numpy().reshape(-1, *SHAPE).astype(np.float64)
    assert stats["latents"]["count"] == latents.shape[0] * SHAPE[1] * SHAPE[2]
    np.testing.assert_allclose(stats["latents"]["mean"], latents.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["latents"]["std"], latents.std(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    return stats


def test_stats_are_numpys_mean_and_std_over_the_written_latents(job):
    output, _ = job
    stats = _check_stats(output)
    assert (stats["rows"], stats["errors"], stats["duplicate_rows"]) == (9, 4, 0)
    assert stats["errors_by_reason"] == {"too_many_pixels": 1, "truncated": 1, "empty": 1, "not_an_image": 1}
    assert stats["last_run"]["processed"] == 13 and stats["last_run"]["images_per_s"] > 0


def test_the_default_placement_pins_one_replica_per_npu(job):
    output, _ = job
    run = json.loads((output / "stats.json").read_text())["last_run"]
    assert run["replica_options"] == {"resources": {"NPU": 1}} and run["replica_pool"] == 2
    assert sum(run["replicas"].values()) == 9
    # "host:pid node ab12cd34 cpu (1 torch thread) NPU 1"
    npus = {name.rsplit("NPU ", 1)[1] for name in run["replicas"]}
    assert npus <= {"0", "1"} and len(npus) == len(run["replicas"])
    # cpu_threads auto (the default): each CPU replica names the torch threads it kept of the node's cores
    threads = [re.search(r" cpu \((\d+) torch threads?\) NPU ", name) for name in run["replicas"]]
    assert all(t and 1 <= int(t.group(1)) <= node_cores() for t in threads), run["replicas"]


# ------------------------------------------------------------------------------------------- resume


def test_a_rerun_redoes_only_what_is_missing(job, tree, tiny_dir, tmp_path):
    output, _ = job
    root, _ = tree
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    last = sorted((copy / "data").glob("part-*.parquet"))[-1]
    lost = pq.read_table(last, columns=["path"]).num_rows
    last.unlink()  # as if the job had died before writing it
    (copy / "data" / ".part-00009.parquet.tmp").write_bytes(b"PAR1 half")  # and while writing this one

    summary = tokenize_dataset(str(root), str(copy), _spec(tiny_dir), retry_errors=True, **JOB)

    assert summary.processed == lost + 4 and summary.skipped == 13 - lost - 4  # the errors are retried
    assert (summary.rows, summary.errors, summary.missing) == (9, 4, 0)
    assert not list((copy / "data").glob(".*.tmp"))
    before, after = _rows(output), _rows(copy)
    assert list(after.index) == list(before.index)
    # Redone rows ran in other batches than the first time: equal up to float32 rounding, not bit for bit.
    np.testing.assert_allclose(_array(after["latents"]), _array(before["latents"]), rtol=1e-5, atol=1e-6)
    assert len(pq.read_table(copy / "errors.parquet")) == 4
    _check_stats(copy)


def _replica_pids(gcs_address: str) -> set[int]:
    """Processes of TokenizeWorker actors of the Ray at ``gcs_address`` (Ray titles an actor's process after its
    class; its workers name their raylet in RAY_RAYLET_PID): other Rays on the machine do not count."""
    raylets, workers = set(), {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if b"/raylet\0" in cmdline and f"--gcs-address={gcs_address}".encode() in cmdline:
                raylets.add(entry.name)
            elif b"TokenizeWorker" in cmdline:
                env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
                workers[int(entry.name)] = env.get(b"RAY_RAYLET_PID", b"").decode()
        except OSError:
            continue  # exited meanwhile
    return {pid for pid, raylet in workers.items() if raylet in raylets}


@pytest.mark.soak
def test_a_replica_and_then_the_whole_job_killed_mid_way_lose_and_repeat_nothing(ray_runtime, tiny_dir, tmp_path):
    root = tmp_path / "many"
    rng = np.random.default_rng(1)
    for i in range(48):
        (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng, 40 + i, 64)).save(root / f"d{i % 4}" / f"{i}.jpg")
    (root / "d0" / "bad.jpg").write_bytes(b"nope")
    output = tmp_path / "out"
    args = [str(root), "-o", str(output), "--model", str(tiny_dir), "--size", str(SIZE), "--device", "cpu"]
    args += ["--resources", '{"NPU": 1}', "--replicas", "1", "--batch-size", "1", "--rows-per-file", "1"]
    args += ["--dtype", "float16", "--address", ray_runtime, "--no-progress"]
    before = _replica_pids(ray_runtime)
    process = start_tokenize_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_parts(output, 1, process)
        (replica,) = _replica_pids(ray_runtime) - before
        os.kill(replica, signal.SIGKILL)  # Ray Data restarts the actor and retries its batch
        parts = len(list((output / "data").glob("part-*.parquet")))
        wait_for_parts(output, parts + 1, process)
        process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
    done_before = sum(pq.read_table(p).num_rows for p in (output / "data").glob("part-*.parquet"))
    assert 1 <= done_before < 48

    spec = PipelineSpec(
        str(tiny_dir), preprocessing=Preprocessing(SIZE), device="cpu", resources={"NPU": 1}, replicas=1, progress=False
    )
    summary = tokenize_dataset(str(root), str(output), spec, latent_dtype="float16")

    rows = pq.read_table(output / "data")
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 48 and summary.errors == 1 and summary.missing == 0
    assert summary.skipped >= done_before and summary.processed == 49 - summary.skipped
    assert rows.schema.field("latents").type.value_type == pa.float16()
    assert np.asarray(pd.read_parquet(output / "data")["latents"].iloc[0]).dtype == np.float16
    assert _check_stats(output)["duplicate_rows"] == 0


def test_an_output_made_with_other_settings_is_refused(job, tree, tiny_dir):
    output, _ = job
    root, _ = tree
    before = sorted(p.name for p in (output / "data").iterdir())
    with pytest.raises(OutputMismatchError, match=r"preprocessing\.crop: 'center' there, 'resize' now"):
        resized = _spec(tiny_dir, preprocessing=replace(PREPROCESSING, crop="resize"))
        tokenize_dataset(str(root), str(output), resized, **JOB)
    with pytest.raises(OutputMismatchError, match="latent_dtype"):
        tokenize_dataset(str(root), str(output), _spec(tiny_dir), **{**JOB, "latent_dtype": "float16"})
    assert sorted(p.name for p in (output / "data").iterdir()) == before


# ---------------------------------------------------------------------------------------- placement


def test_a_placement_the_cluster_cannot_satisfy_fails_at_once(ray_runtime, tree, tiny_dir, tmp_path):
    root, _ = tree
    with pytest.raises(PlacementError, match="--resources"):
        tokenize_dataset(str(root), str(tmp_path / "out"), _spec(tiny_dir, resources={"GPU": 1}))
    assert not (tmp_path / "out").exists()


def test_replicas_that_cannot_start_fail_with_the_reason_and_leave_nothing(ray_runtime, tree, tiny_dir, tmp_path):
    root, _ = tree
    spec = _spec(tiny_dir, device="npu:0")  # placed on an NPU, but no torch_npu here
    with pytest.raises(ReplicaStartError, match="DeviceUnavailableError: device 'npu:0'"):
        tokenize_dataset(str(root), str(tmp_path / "out"), spec)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- the model stage


def test_the_model_stage_passes_error_rows_through_untouched(ray_runtime, tree, tiny_dir, replica):
    root, _ = tree
    good, bad = str(root / "cat" / "rgb.jpg"), str(root / "dog" / "text.jpg")
    batch = preprocess_rows(
        pa.table({"path": [bad, good], "label": ["dog", "cat"]}), preprocessing=PREPROCESSING, filesystem=None
    )
    kwargs = {"spec": _spec(tiny_dir), "device": "cpu", "flip": False, "latent_dtype": "float32"}
    worker = TokenizeWorker(**kwargs, expected=replica.info.identity())
    out = worker(batch)
    assert out.column("latents").is_null().to_pylist() == [True, False]
    image, (width, _) = preprocess_with_info(good, SIZE)
    assert out.column("width").to_pylist()[1] == width
    latents = np.asarray(out.column("latents")[1].as_py(), np.float32).reshape(1, *SHAPE)
    np.testing.assert_array_equal(latents, replica.encode(image[None]).latents)  # the same call: bit for bit
    with pytest.raises(RuntimeError, match=r"config_digest: .* served, '0000' asked for"):
        TokenizeWorker(**kwargs, expected={**replica.info.identity(), "config_digest": "0000"})


class _BatchRecorder(TokenizeWorker):
    """The real worker, noting the size of every model batch it runs."""

    def process(self, images: np.ndarray, rows: pa.Table) -> dict[str, np.ndarray]:
        self.batches = [*getattr(self, "batches", []), len(images)]
        return super().process(images, rows)


def test_a_block_is_split_into_model_batches_in_order(ray_runtime, tree, tiny_dir, replica):
    paths = sorted(tree[1])[:9]
    batch = preprocess_rows(
        pa.table({"path": paths, "label": [None] * len(paths)}), preprocessing=PREPROCESSING, filesystem=None
    )
    spec = _spec(tiny_dir, batch_size=4)
    kwargs = {"spec": spec, "device": "cpu", "flip": False, "latent_dtype": "float32"}
    worker = _BatchRecorder(**kwargs, expected=replica.info.identity())
    out = worker(batch)
    valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
    per_batch = [int(valid[i : i + 4].sum()) for i in range(0, len(paths), 4)]
    assert worker.batches == [n for n in per_batch if n]  # batches of at most 4 rows, error rows left out
    assert out.column("path").to_pylist() == paths and out.column("error").equals(batch.column("error"))
    good = [p for p, ok in zip(paths, valid, strict=True) if ok]
    images = np.stack([preprocess(p, SIZE) for p in good])
    latents = np.asarray(out.filter(out.column("error").is_null()).column("latents").to_pylist(), np.float32)
    # Other batch compositions than one call on all of them: equal to float32 rounding.
    np.testing.assert_allclose(latents.reshape(len(good), *SHAPE), replica.encode(images).latents, rtol=1e-5, atol=1e-6)
