"""Jobs on a running Serve app (``--serve-app``): the app's model replica computes them at batch priority, online
requests first. One app (the tiny checkpoint with CLIP's vocabulary, so zero-shot runs too) on the shared Serve;
each job's output is compared with what one in-process replica computes from the same images."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from helpers import SIZE, TINY, TINYTEXT, UNLIMITED, png_bytes, random_image, wait_until
from PIL import Image
from serving import ServeInstance, deploy, replica_actors

from deployments import AppSettings, compose_app
from deployments.model.batching import QUIET_S
from vtp_ray import VTPReplica
from vtp_ray.images import ImageLimits, preprocess_with_info
from vtp_ray.metrics import psnr
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.decode import decode_latents
from vtp_ray.pipeline.jobs.evaluate import evaluate_dataset
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset
from vtp_ray.pipeline.jobs.zeroshot import zero_shot_dataset
from vtp_ray.pipeline.priority import LOW_NICENESS
from vtp_ray.pipeline.served import ServedModelChanged, ServedReplica, ServeTarget, connect
from vtp_ray.text.classifier import class_embeddings
from vtp_ray.text.imagenet import resolve_template_set

pytestmark = pytest.mark.slow

APP = "fleet"
IMAGES = 40


def app_settings() -> AppSettings:
    # batch_min_share 0: online requests strictly first, so that the replica's own count of batch calls started
    # while an online request waited must stay 0.
    batching = {"max_batch_size": 4, "batch_min_share": 0.0}
    return AppSettings(model=TINYTEXT, image_size=SIZE, placement="cpu", batching=batching, rate_limits=UNLIMITED)


def batch_items(base_url: str) -> int:
    return httpx.get(f"{base_url}/v1/model").json()["work"]["batch"]["items"]


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance) -> str:
    return deploy(compose_app(app_settings()), APP, "/fleet")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders of small PNGs and one file that is no image."""
    root = tmp_path_factory.mktemp("fleet-images")
    for i in range(IMAGES):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(png_bytes(random_image(48 + i % 5 * 8, 72, seed=i)))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def spec(**changes: Any) -> PipelineSpec:
    values = {
        "model": TINYTEXT,
        "preprocessing": Preprocessing(size=SIZE),
        "batch_size": 8,
        "block_size": 8,
        "resources": "cpu",
        "progress": False,
        "labels_from_dirs": True,
    }
    return PipelineSpec(**{**values, **changes})


def on_app(**changes: Any) -> PipelineSpec:
    return spec(serve=ServeTarget(APP), **changes)


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    """The app's checkpoint in this process: what the jobs on the app are compared with."""
    return VTPReplica(TINYTEXT, device="cpu", warmup_size=0)


def latents_by_path(output: Path) -> dict[str, np.ndarray]:
    rows = pd.read_parquet(output / "data")
    return {p: np.asarray(v, np.float32) for p, v in zip(rows["path"], rows["latents"], strict=True)}


def ray_threads() -> Iterator[tuple[str, bool, int]]:
    """Each thread of this machine's Ray worker processes, from ``/proc``: ``(process title, main thread?,
    niceness)``."""
    for process in Path("/proc").glob("[0-9]*"):
        try:
            title = (process / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::"):
                for task in list((process / "task").iterdir()):
                    nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)
                    yield title, task.name == process.name, nice
        except (OSError, ValueError, IndexError):
            continue  # a process or thread that ended meanwhile


def is_app(title: str) -> bool:
    return title.startswith(("ray::Serve", "ray::Proxy"))


def lowered_ray_threads() -> set[str]:
    """The job's threads at its ``low`` priority (niceness 19), outside the app's processes:
    ``"<process title> / main"`` (the process's main thread) or ``"<process title> / thread"``."""
    return {
        f"{title} / {'main' if main else 'thread'}"
        for title, main, nice in ray_threads()
        if nice == LOW_NICENESS and not is_app(title)
    }


def lowered_threads_here() -> set[str]:
    """This process's Python threads at niceness 19, by name (without the ``-<id>`` suffix)."""
    found = set()
    for thread in threading.enumerate():
        try:
            if thread.native_id and os.getpriority(os.PRIO_PROCESS, thread.native_id) == LOW_NICENESS:
                found.add(thread.name.split("-")[0])
        except OSError:
            continue  # it ended meanwhile
    return found


class Background:
    """A thread that runs ``_run`` from the block's start until its end (``_stop`` tells it to end)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        raise NotImplementedError


class Sampler(Background):
    """Calls ``sample`` every 200 ms; ``seen``: the union of its answers."""

    def __init__(self, sample: Any) -> None:
        super().__init__()
        self.sample, self.seen = sample, set()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.seen.update(self.sample())


class OnlineLoad(Background):
    """A client posting /v1/encode requests one after another; keeps every status and Server-Timing."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.codes, self.stages = url, [], []

    def _run(self) -> None:
        body = png_bytes(random_image(64, 64, seed=99))
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                answer = client.post("/v1/encode", content=body, headers={"content-type": "image/png"})
                self.codes.append(answer.status_code)
                timing = dict(e.strip().split(";dur=") for e in answer.headers.get("server-timing", "").split(",") if e)
                self.stages.append({k: float(v) for k, v in timing.items()})


def test_a_tokenize_job_on_the_app_equals_a_standalone_one_while_online_requests_are_answered(
    base_url: str, images: Path, replica: VTPReplica, tmp_path: Path
) -> None:
    result: dict[str, Any] = {}
    with OnlineLoad(base_url) as online, Sampler(lowered_ray_threads) as low, Sampler(lowered_threads_here) as driver:
        job = threading.Thread(
            target=lambda: result.update(summary=tokenize_dataset([str(images)], str(tmp_path / "on-app"), on_app()))
        )
        job.start()
        wait_until(lambda: batch_items(base_url) > 0, 60, "the job's first block")
        # New batching settings mid-job. Through the Python API this replaces the replica (a `serve deploy` of a
        # config only reconfigures it: tests/test_serve_deploy.py): the job retries its block and goes on.
        deploy(compose_app(app_settings(), user_config={"max_batch_size": 2, "batch_min_share": 0.0}), APP, "/fleet")
        job.join(240)
        answered_during_job = len(online.codes)
    summary = result["summary"]
    assert httpx.get(f"{base_url}/v1/model").json()["batching"]["max_batch_size"] == 2
    assert summary.rows == IMAGES and summary.errors == 1 and summary.missing == 0
    assert summary.stats["last_run"]["serve_app"]["app"] == APP  # the report says where it ran
    # One block in flight per model replica: a job adds at most 1 to each replica's ongoing requests, the count
    # Serve's autoscaler reads (docs/shared-fleet.md: with target_ongoing_requests >= 2 a job alone never scales the
    # app up).
    assert summary.stats["last_run"]["replica_pool"] == summary.stats["last_run"]["serve_app"]["replicas"] == 1
    assert answered_during_job > 0 and set(online.codes) == {200}
    # The job's own work ran below the app on the CPU (--cpu-priority low, the default on an app: niceness 19, Ray's
    # workers run at 15): its preprocessing and its model stage (tasks, on an app) in a thread of their own in the
    # Ray workers, Ray Data's executor on this driver; none of the app's processes.
    # (a task's worker title names its task while it runs one, ray::IDLE between tasks)
    stage = "ray::MapBatches(TokenizeWorkerOnServeApp)"
    titles = ("ray::ReadRange", "ray::MapBatches(preprocess_block)", stage, "ray::IDLE")
    tasks = {k for k in low.seen if k.startswith(titles)}
    assert tasks == {k.split(" / ")[0] + " / thread" for k in tasks}, low.seen  # never a main thread
    # The stage's title shows only while one of its tasks waits for the app (tens of ms a block), so a 200 ms sampler
    # may miss it: its priority is pinned by tests/test_priority.py; here, where seen, it ran in a lowered thread.
    assert tasks, low.seen
    assert not any("MapWorker" in k for k in low.seen), low.seen  # no model-stage actor
    assert "StreamingExecutor" in driver.seen, driver.seen  # Ray Data's executor on the driver, too
    app = {(title, nice) for title, _, nice in ray_threads() if is_app(title)}
    assert app and LOW_NICENESS not in {nice for _, nice in app}, app

    # What a standalone job writes is what one replica computes from the preprocessed images (tests/test_tokenize.py):
    # the app's rows are compared with such a replica. fp32, other batch compositions: a stated tolerance.
    ours = latents_by_path(tmp_path / "on-app")
    paths = sorted(ours)
    pixels = np.stack([preprocess_with_info(path, SIZE, "center", ImageLimits())[0] for path in paths])
    expected = replica.encode(pixels).latents.reshape(len(paths), -1)
    for path, latents in zip(paths, expected, strict=True):
        np.testing.assert_allclose(ours[path], latents, rtol=1e-4, atol=1e-5, err_msg=path)

    work = httpx.get(f"{base_url}/v1/model").json()["work"]
    assert work["batch_calls_ahead_of_online"] == 0  # no online request ever waited for a batch call to start


def test_a_block_on_an_idle_app_runs_in_calls_larger_than_batch_work_size(base_url: str) -> None:
    """With no online request for ``QUIET_S``, a job's model calls grow past ``batch_work_size`` (up to
    ``batch_idle_work_size``): fewer, larger calls than the fixed size would make."""
    from vtp_ray.pipeline.spec import ModelFacts

    expected = ModelFacts.of(spec().model).identity(spec())
    served = ServedReplica(connect(ServeTarget(APP), expected), expected)
    time.sleep(QUIET_S)  # no online request for that long (an earlier test's online load): calls may grow
    info = httpx.get(f"{base_url}/v1/model").json()
    base = info["batching"]["batch_work_size"] or info["batching"]["max_batch_size"]
    before = info["work"]["batch"]
    served.encode(np.stack([random_image(SIZE, SIZE, seed=200 + i) for i in range(12 * base)]))
    after = httpx.get(f"{base_url}/v1/model").json()["work"]["batch"]
    items, calls = after["items"] - before["items"], after["calls"] - before["calls"]
    assert items == 12 * base and calls < 12, (items, calls)  # calls of batch_work_size would have been 12


@pytest.mark.soak  # three jobs, 18-38 s of CI's 15 minutes; CI checks each served verb against the replica (below)
def test_eval_decode_and_zero_shot_run_on_the_app(
    base_url: str, images: Path, replica: VTPReplica, tmp_path: Path
) -> None:
    """Each job's rows equal what one in-process replica computes from the same images (fp32 on the CPU: the
    app's batches differ from these, so the comparisons carry tolerances)."""

    report = evaluate_dataset([str(images)], tmp_path / "eval", on_app())
    assert report["counts"]["evaluated"] == IMAGES and report["serve_app"]["app"] == APP
    rows = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    pixels = np.stack([preprocess_with_info(r["path"], SIZE, "center", ImageLimits())[0] for r in rows])
    np.testing.assert_allclose([r["psnr"] for r in rows], psnr(pixels, replica.reconstruct(pixels)), atol=0.05)

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    zs = zero_shot_dataset([str(images)], tmp_path / "zs", on_app(), classnames=str(classes), template_set="default")
    assert zs["counts"]["evaluated"] == IMAGES
    rows = pq.read_table(tmp_path / "zs" / "per_image.parquet").to_pylist()
    classifier = class_embeddings(replica.embed_text, ["cat", "dog"], resolve_template_set("default"))
    pixels = np.stack([preprocess_with_info(r["path"], SIZE, "center", ImageLimits())[0] for r in rows])
    _, probabilities = replica.classify(pixels, classifier).top(2)
    np.testing.assert_allclose([r["top5_probabilities"] for r in rows], probabilities, rtol=1e-3, atol=1e-5)

    tokenized = tmp_path / "tokens"
    tokenize_dataset([str(images)], str(tokenized), spec())
    decoded = decode_latents([str(tokenized)], str(tmp_path / "pngs"), on_app(), npz=True)
    assert decoded.images == IMAGES
    shape = json.loads((tokenized / "manifest.json").read_text())["columns"]["latents"]["shape"]
    parts = sorted((tokenized / "data").glob("part-*.parquet"))  # the decode job's order: parts, then rows
    latents = np.concatenate(
        [np.stack(pq.read_table(part)["latents"].to_numpy(zero_copy_only=False)) for part in parts]
    )
    latents = latents.astype(np.float32).reshape(-1, *shape)
    ours = np.load(Path(decoded.output) / "samples.npz")["arr_0"].astype(int)
    assert np.abs(ours - replica.decode(latents).astype(int)).max() <= 1  # uint8 rounding
    # PNGs: encoded by the job's CPU tasks after the app's stage, written by the driver
    assert decode_latents([str(tokenized)], str(tmp_path / "files"), on_app()).images == IMAGES
    files = np.stack([np.asarray(Image.open(tmp_path / "files" / f"{i:06d}.png")) for i in range(IMAGES)])
    assert np.abs(files.astype(int) - ours).max() <= 1


def test_a_job_for_another_checkpoint_is_refused_before_it_reads_anything(base_url: str, images: Path, tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"serves vtp-tinytext \(config_digest"):
        tokenize_dataset([str(images)], str(tmp_path / "wrong"), on_app(model=TINY))
    with pytest.raises(ValueError, match="precision: 'fp32' served, 'bf16' asked for"):
        tokenize_dataset([str(images)], str(tmp_path / "wrong"), on_app(precision="bf16"))
    with pytest.raises(ValueError, match="no Serve application 'nope'"):
        tokenize_dataset([str(images)], str(tmp_path / "wrong"), spec(serve=ServeTarget("nope")))
    assert time.monotonic() - started < 30 and not (tmp_path / "wrong").exists()


def test_a_replica_serving_another_model_refuses_the_block(base_url: str) -> None:
    """What a job meets when the app is redeployed with another model mid-job: its next block is refused."""
    model = spec().model
    from vtp_ray.pipeline.spec import ModelFacts

    expected = ModelFacts.of(model).identity(spec())
    served = connect(ServeTarget(APP), expected)
    replica = ServedReplica(served, {**expected, "config_digest": "another-checkpoint"})
    with pytest.raises(ServedModelChanged, match="another-checkpoint"):
        replica.encode(np.zeros((2, SIZE, SIZE, 3), np.uint8))


def test_each_served_verb_answers_a_block_as_the_replica_does(base_url: str, replica: VTPReplica) -> None:
    """A block comes back as the verb's batch result (one array, or one ``Encoded``; not one object per input), equal
    to the in-process replica's within float tolerance (the app forms model calls of its own sizes)."""
    from vtp_ray.pipeline.spec import ModelFacts

    expected = ModelFacts.of(spec().model).identity(spec())
    served = ServedReplica(connect(ServeTarget(APP), expected), expected)
    images = np.stack([random_image(SIZE, SIZE, seed=100 + i) for i in range(5)])
    encoded, local = served.encode(images), replica.encode(images)
    assert isinstance(encoded.latents, np.ndarray) and encoded.latents.shape == local.latents.shape
    np.testing.assert_allclose(encoded.latents, local.latents, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(encoded.clip_embedding, local.clip_embedding, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(served.embed(images), replica.embed(images), rtol=1e-4, atol=1e-5)
    for verb, inputs in (("decode", local.latents), ("reconstruct", images)):
        ours, theirs = getattr(served, verb)(inputs), getattr(replica, verb)(inputs)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8, verb
        assert np.abs(ours.astype(int) - theirs).max() <= 1, verb  # a float rounding away from a level, at most
    texts = [f"a photo of a {word}" for word in ("cat", "dog", "bird")]
    np.testing.assert_allclose(served.embed_text(texts, chunk=2), replica.embed_text(texts), rtol=1e-4, atol=1e-5)


@pytest.mark.soak
def test_a_model_replica_killed_mid_job_costs_a_retry_not_a_row(base_url: str, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "killed"
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(summary=tokenize_dataset([str(images)], str(output), on_app())))
    job.start()
    wait_until(lambda: batch_items(base_url) > 0, 60, "the job to start")
    (replica,) = replica_actors(APP, deployment="VTPReplica")
    ray.kill(replica, no_restart=False)
    job.join(240)
    summary = result["summary"]
    assert summary.rows + summary.errors == IMAGES + 1 and summary.missing == 0
    assert summary.stats["duplicate_rows"] == 0
    again = tokenize_dataset([str(images)], str(output), on_app())  # resuming: nothing left to do
    assert again.processed == 0 and again.rows == IMAGES
