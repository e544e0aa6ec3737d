"""``vtp-ray eval --task linear-probe`` on Ray Train, on the shared local Ray with the tiny model at 64 px.

Upstream's protocol runs through the CLI with 2 CPU workers (DDP over the heads, the val set shared between them).
Each worker reads datasets of its own, in order, so the run's batches are known: one process training on the same
stream with the doubled batch must end with the same heads (DDP's equivalence). In the soak tier the command runs
again in a process of its own: one of its workers is killed after the first checkpoint (Ray Train restarts the group
from it), then the command is interrupted (SIGINT) after the second and run again, which must continue from that
one and end with the uninterrupted run's heads (the proof that neither restart lost or repeated anything).

The images' class is a colour cast under strong noise and a random tint (the tiny model's features carry colour,
but no head reaches 100%), so learning is checked against an independent fit: a full-batch
multinomial logistic regression (L-BFGS) on the features the fast mode stores; the fast mode must agree with the
protocol's heads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ROOT, TINY, png_bytes, write_tar
from PIL import Image

from vtp_ray.cli import main
from vtp_ray.images import ImageLimits, load_image
from vtp_ray.model import load_model
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.report import compare_reports, summary_line
from vtp_ray.pipeline.spec import SampleOptions
from vtp_ray.pipeline.stages import pixels
from vtp_ray.probe import ProbeSettings
from vtp_ray.probe.data import epoch_dataset, epoch_plan, find_probe_sets, validation_dataset
from vtp_ray.probe.heads import LinearHeads, make_optimizer, make_schedule, probe_features, train_step
from vtp_ray.probe.job import RESULTS, linear_probe
from vtp_ray.probe.transforms import resize_center_crop

pytestmark = pytest.mark.slow

CLASSES = 4
COLOURS = np.array([[150, 110, 110], [110, 150, 110], [110, 110, 150], [130, 130, 130]], float)
LEARNING_RATES = "0.1,1,10,50"  # the tiny model's features are small: larger rates than upstream's grid
SETTINGS = {"epochs": 4, "epoch_length": 8, "batch_size": 8, "size": 64, "resize_size": 72, "log_every": 4}
#: "Within a few points": the val set has 96 images (1 image ~ 1 point) and the heads are trained for 32 steps.
POINTS = 10.0


def colour_image(c: int, rng: np.random.Generator) -> np.ndarray:
    pixels = COLOURS[c] + rng.uniform(-30, 30, 3) + rng.normal(0, 20, (72, 88, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(1)
    for split, count in (("train", 32), ("val", 24)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(colour_image(c, rng)).save(root / split / f"c{c}" / f"{i}.png")
    (root / "train" / "c0" / "broken.png").write_bytes(b"\x89PNG not a png")  # an error row, every pass
    (root / "val" / "c9").mkdir()
    Image.fromarray(colour_image(0, rng)).save(root / "val" / "c9" / "0.png")  # a class training lacks
    return {"train": root / "train", "val": root / "val"}


def snapshot_holds(run: Path, epoch: int) -> bool:
    """Ray Train registered the checkpoint of ``epoch`` (in its run snapshot, which a restart resumes from)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f"epoch-{epoch:04d}" in snapshot.read_text()


def wait_for(predicate: Any, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def train_worker_pids() -> list[int]:
    """The pids of this session's live Ray Train workers."""
    from ray._private import state

    workers = [a for a in state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == "RayTrainWorker"]
    assert workers, "no live Ray Train worker"
    return [w["Pid"] for w in workers]


def python_stacks(pid: int) -> str:
    """Where process ``pid``'s Python threads are (py-spy, which Ray's dashboard installs), for a failure message."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(no stacks: {e})"
    return dump.stdout + dump.stderr


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@pytest.fixture(scope="module", autouse=True)
def quick_health_checks() -> Any:
    """Ray Train's controller polls its workers every 2 s: it notices an ended or failed worker group sooner; and no
    preemption watcher (one actor less per run). The probe hands RAY_TRAIN_* settings on to the trainer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        yield


def probe_args(sets: dict[str, Path], out: Path, address: str, *extra: str) -> list[str]:
    args = ["eval", "--task", "linear-probe", "--train", str(sets["train"]), "--val", str(sets["val"]), "-o",
            str(out), "--model", TINY, "--resources", "cpu", "--learning-rates", LEARNING_RATES, "--n-last-blocks",
            "1,2", "--no-progress", "--address", address, *extra]  # fmt: skip
    return args + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]


@pytest.fixture(scope="module")
def protocol(ray_runtime: str, sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Upstream's protocol through the CLI, 2 workers, fp32 (its heads are compared with an in-process run of the
    same stream: bf16 would differ with the batch size), uninterrupted."""
    out = tmp_path_factory.mktemp("protocol")
    args = probe_args(sets, out, ray_runtime, "--replicas", "2", "--precision", "fp32")
    assert main([*args, "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    settings = ProbeSettings(**SETTINGS, learning_rates=(0.1, 1.0, 10.0, 50.0), n_last_blocks=(1, 2), precision="fp32")
    return {"out": out, "report": report, "args": args, "settings": settings}


@pytest.fixture(scope="module")
def fast(ray_runtime: str, sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fast mode, one CPU worker, the precision left to the CPU (auto)."""
    out = tmp_path_factory.mktemp("fast")
    spec = PipelineSpec(model=TINY, resources="cpu", replicas=1, preprocessing=Preprocessing(size=64), progress=False)
    settings = ProbeSettings(**SETTINGS, learning_rates=(0.1, 1.0, 10.0, 50.0), n_last_blocks=(1, 2), mode="fast")
    report = linear_probe([str(sets["train"])], [str(sets["val"])], out, spec, settings)
    return {"out": out, "report": report}


def test_the_protocol_trains_every_epoch_once_on_two_workers(protocol: dict) -> None:
    report = protocol["report"]
    assert report["resumed_from"] == [] and [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    assert report["counts"]["iterations"] == 4 * 8 and report["counts"]["images_seen"] == 4 * 8 * 16
    assert report["workers"]["workers"] == 2 and report["workers"]["backend"] == "gloo"
    assert report["workers"]["resources_per_worker"] == {"CPU": 0.5}


@pytest.mark.soak  # a second run of the protocol, with a worker killed and the command interrupted: CI's budget
def test_the_protocol_continues_from_its_checkpoints_after_a_killed_worker_and_an_interrupt(
    protocol: dict[str, Any], sets: dict[str, Path], ray_runtime: str, tmp_path: Path
) -> None:
    """The protocol's command again, in a process of its own: a worker killed once the first epoch's checkpoint is
    registered (Ray Train restarts the group from it), the command interrupted once the second's is, then run again
    (it continues from that one). Neither restart may lose or repeat a step: the heads equal the uninterrupted
    run's."""
    out = tmp_path / "interrupted"
    args = probe_args(sets, out, ray_runtime, "--replicas", "2", "--precision", "fp32")
    paused: list[int] = []
    hung = ""
    first = subprocess.Popen([sys.executable, "-m", "vtp_ray.cli", *args], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    run = out / "linear-probe"
    try:
        wait_for(lambda: snapshot_holds(run, 1) or first.poll() is not None, "the first checkpoint")
        killed = train_worker_pids()[-1] if first.poll() is None else None
        signal_all([killed] if killed else [], signal.SIGKILL)
        wait_for(lambda: snapshot_holds(run, 2) or first.poll() is not None, "the second checkpoint")
        # The last epochs take a fraction of a second each, less than the interrupt takes to stop the workers: they
        # are paused first, so that the command is interrupted with epochs left to train, and killed once it is gone
        # (a paused process does not answer Ray's request to exit).
        paused = train_worker_pids() if first.poll() is None else []
        signal_all(paused, signal.SIGSTOP)
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Before the driver took Ctrl-C as a flag (vtp_ray.probe.job.interrupt_flag), Ray's wait dropped the
            # interrupt now and then and the command kept waiting. Should that come back, the command is killed, as a
            # second Ctrl-C would end it, the resume is checked all the same, and the test fails with its stacks.
            hung = python_stacks(first.pid)
    finally:
        first.kill()
        first.wait(timeout=30)
        signal_all(paused, signal.SIGKILL)
    assert killed, "the run ended before a worker could be killed"
    assert first.returncode != 0, "the run ended before it could be interrupted"
    assert not (out / "report.json").exists()
    assert main([*args, "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    # Ray Train's restart after epoch 1; the command's re-run after epoch 2 (or 3, when the workers had saved it by
    # the time they were paused)
    assert report["resumed_from"][0] == 1 and report["resumed_from"][1] in (2, 3) and len(report["resumed_from"]) == 2
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]  # every epoch trained once
    assert report["counts"]["iterations"] == 4 * 8 and report["counts"]["images_seen"] == 4 * 8 * 16
    resumed, uninterrupted = (heads_of(o) for o in (out, protocol["out"]))
    for name, value in uninterrupted.items():
        # the same stream and steps; float32 sums in another order (gloo's allreduce): 1e-4 relative
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-4 * value.abs().max().item())
    assert not hung, f"the interrupted command still ran 60 s later:\n{hung}"


def heads_of(out: Path) -> dict[str, torch.Tensor]:
    """The heads a probe run saved after its last epoch."""
    return torch.load(out / "linear-probe" / f"epoch-{SETTINGS['epochs']:04d}" / "heads.pt", weights_only=True)["heads"]


def test_the_report_holds_every_head_the_best_and_every_error(protocol: dict[str, Any]) -> None:
    report, out = protocol["report"], protocol["out"]
    assert report["task"] == "linear-probe" and report["mode"] == "protocol"
    assert report["global_batch_size"] == 16 and report["classes"] == CLASSES
    assert len(report["heads"]) == 8 and all(h["top1"] is not None for h in report["heads"].values())
    lrs = {round(h["lr"], 6) for h in report["heads"].values()}
    assert lrs == {round(lr * 16 / 256, 6) for lr in (0.1, 1.0, 10.0, 50.0)}  # scaled by global batch / 256
    assert report["metrics"]["top1"] == max(h["best_top1"] for h in report["history"])
    assert report["counts"]["evaluated"] == 96  # every val image once, over 2 workers (the unknown class excluded)
    reasons = {Path(e["path"]).name: e["reason"] for e in report["errors"]}
    assert reasons == {"broken.png": "not_an_image", "0.png": "unknown_class"}
    upstream = json.loads((out / RESULTS).read_text())
    assert upstream["best_accuracy"] == report["metrics"]["top1"]
    assert upstream["best_classifier"] in upstream["all_accuracies"] and len(upstream["all_accuracies"]) == 8
    assert report["random_weights"] is False and report["precision"] == "fp32"


def test_the_fast_mode_stores_its_features_and_says_it_is_not_upstreams_protocol(fast: dict[str, Any]) -> None:
    report = fast["report"]
    assert report["mode"] == "fast" and "NOT upstream's protocol" in report["protocol"]
    assert report["precision"] in ("bf16", "fp32")  # auto: bf16 where this CPU multiplies it natively
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4] and report["resumed_from"] == []
    assert report["feature_extraction"]["reused"] is False
    assert report["feature_extraction"]["images"] == {"train": 128, "val": 96}
    assert {e["reason"] for e in report["errors"]} == {"not_an_image", "unknown_class"}
    assert "fast mode: NOT upstream's protocol" in summary_line(report)


def lbfgs_accuracy(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Full-batch multinomial logistic regression (standardized features, L2 0.1), fitted by L-BFGS."""
    (x, y), (xv, yv) = train, val
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mean) / std, (xv - mean) / std
    w = torch.zeros(x.shape[1], CLASSES, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(CLASSES, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.1 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return 100.0 * ((xv @ w + b).argmax(1) == yv).double().mean().item()


def stored_features(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(sorted(map(str, directory.glob("part-*.parquet"))))
    values = table.column("features").combine_chunks()
    x = values.values.to_numpy().reshape(table.num_rows, -1).astype(np.float64)
    return torch.from_numpy(x), torch.from_numpy(table.column("target").to_numpy().astype(np.int64))


def test_learning_matches_an_independent_fit_and_the_fast_mode_agrees(protocol: dict, fast: dict) -> None:
    features = fast["out"] / "features"
    reference = lbfgs_accuracy(stored_features(features / "train"), stored_features(features / "val"))
    protocol_top1, fast_top1 = protocol["report"]["metrics"]["top1"], fast["report"]["metrics"]["top1"]
    assert 45 < reference < 95  # learnable, and not trivially
    assert abs(protocol_top1 - reference) <= POINTS, (protocol_top1, reference)
    assert abs(fast_top1 - protocol_top1) <= POINTS, (fast_top1, protocol_top1)


def test_compare_reports_two_probe_runs(protocol: dict, fast: dict, capsys: pytest.CaptureFixture) -> None:
    result = compare_reports(protocol["out"], fast["out"])
    assert result["modes"] == {"a": "protocol", "b": "fast"}
    assert len(result["heads"]) == 8  # joined on (blocks, base rate): the global batches differ
    assert result["metrics"]["top1"]["diff"] == pytest.approx(
        fast["report"]["metrics"]["top1"] - protocol["report"]["metrics"]["top1"]
    )
    assert main(["eval", "--compare", str(protocol["out"]), str(fast["out"])]) == 0
    printed = capsys.readouterr().out
    assert "modes differ" in printed and "n=2 lr=50" in printed


def test_a_run_with_other_settings_is_refused_in_the_same_storage(protocol: dict[str, Any], capsys: Any) -> None:
    args = [a if a != "--epochs=4" else "--epochs=5" for a in protocol["args"]]
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- DDP


def test_two_workers_train_the_heads_as_one_process_with_the_doubled_batch(
    protocol: dict[str, Any], sets: dict[str, Path]
) -> None:
    """The same stream in this process, without Ray Train: one worker, batch 2 x 8, never interrupted. Each step's
    global batch holds the same images (the workers take every other image of the epoch, augmented by their place
    in the stream), and DDP's average of the workers' gradients is the global batch's mean: the heads must match
    those of the 2-worker run."""
    settings = replace(protocol["settings"], batch_size=16)
    train, _, classes = find_probe_sets([str(sets["train"])], [str(sets["val"])], SampleOptions())
    model = load_model(TINY).model
    specs = settings.heads(workers=1)
    heads = LinearHeads(specs, 64, len(classes), settings.init_std, settings.seed)
    optimizer = make_optimizer(heads, specs, settings)
    schedule = make_schedule(optimizer, settings.iterations)
    for epoch in range(settings.epochs):
        dataset = epoch_dataset(train, settings, epoch, 0, 1, block_rows=16, limits=ImageLimits(), preprocess_cpus=0.5)
        dataset.context.execution_options.preserve_order = True
        for batch in dataset.iter_batches(batch_size=16, batch_format="pyarrow"):
            batch = batch.filter(batch.column("error").is_null())
            images = torch.from_numpy(pixels(batch.column("image"), 64))
            targets = torch.from_numpy(batch.column("target").to_numpy().astype(np.int64))
            train_step(heads, optimizer, schedule, probe_features(model, images, 2), targets)
    saved = heads_of(protocol["out"])
    for name, value in heads.state_dict().items():
        # float32 sums in another order (gloo's allreduce, batches of 8 in the trunk) over 32 steps: 1e-4 relative
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-4 * value.abs().max().item())


# ------------------------------------------------------------------------------------------- reads


def test_shards_and_parquet_bytes_are_read_as_planned(ray_runtime: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = {f"{i:04d}": colour_image(i % CLASSES, rng) for i in range(10)}
    members: dict[str, bytes] = {}
    for key, image in images.items():
        members[f"{key}.png"], members[f"{key}.cls"] = png_bytes(image), str(int(key) % CLASSES).encode()
    members.update({"word.png": png_bytes(images["0000"]), "word.cls": b"dog", "big.png": png_bytes(images["0001"])})
    members.update({"big.cls": b"7", "none.cls": b"1"})  # a class out of range, a sample without an image
    shard = tmp_path / "train" / "00000.tar"
    write_tar(shard, members)
    import pyarrow as pa

    keys = sorted(images)
    (tmp_path / "val").mkdir()
    pq.write_table(pa.table({"key": keys, "jpg": [png_bytes(images[k]) for k in keys],
                             "label": [int(k) % CLASSES for k in keys]}), tmp_path / "val" / "a.parquet",
                   row_group_size=3)  # fmt: skip
    train, val, classes = find_probe_sets([str(shard)], [str(tmp_path / "val")], SampleOptions(), num_classes=4)
    assert classes == ["0", "1", "2", "3"] and train.total == 13 and val.total == 10
    settings = ProbeSettings(epochs=2, epoch_length=2, batch_size=5, size=32, resize_size=40, seed=5)
    common = {"limits": ImageLimits(), "preprocess_cpus": 0.5, "block_rows": 4}
    # epoch 1 of 2 workers x 2 iterations x 5: samples 20 .. 39 of the stream, 20 .. 29 for worker 0
    rows = [row for rank in (0, 1) for row in epoch_dataset(train, settings, 1, rank, 2, **common).take_all()]
    _, starts, stops = epoch_plan(train.sizes, 5, 1, 20)
    assert len(rows) == 20 == int((stops - starts).sum())
    reasons = {r["path"].split("#")[1]: r["reason"] for r in rows if r["reason"]}
    assert set(reasons.values()) <= {"bad_label", "no_image"} and reasons.get("word", "bad_label") == "bad_label"
    for row in rows:
        if row["reason"] is None:
            key = row["path"].split("#")[1]
            assert row["path"] == f"{shard}#{key}" and row["target"] == int(key) % CLASSES and len(row["image"]) == 3072
    val_rows = validation_dataset(val, settings, **common).take_all()
    assert [r["path"].split("#")[1] for r in val_rows] == keys  # in order, every sample once
    for row, key in zip(val_rows, keys, strict=True):
        expected = resize_center_crop(load_image(png_bytes(images[key])), 40, 32)
        np.testing.assert_array_equal(np.frombuffer(row["image"], np.uint8).reshape(32, 32, 3), expected)
