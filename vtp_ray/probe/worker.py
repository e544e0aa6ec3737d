"""The probe's Ray Train worker: ``train_loop`` runs in every ``TorchTrainer`` worker, one per accelerator.

Each worker holds the frozen trunk (a ``VTPReplica``: its model, device and precision) and every linear head under
DDP; the heads' gradients are averaged over the workers at each step, so ``W`` workers with batch ``B`` train the
heads as one process would with batch ``W x B``. Per epoch the worker reads its own part of the epoch
(``ray.train.get_dataset_shard("train-<epoch>-<rank>")``: every worker has datasets of its own, so no Ray Data split
coordinator is started per epoch), computes the features of each batch on its device
(``heads.probe_features``; in the fast mode the batch already holds them), steps the heads, then evaluates every head
on its part of the validation set, sums the counts over the workers, and reports: rank 0 with a checkpoint of the
heads, the optimizer and the schedule, which a restarted worker group (a failed worker) or a re-run of the command
(same ``RunConfig`` name and storage path) resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..cpu_threads import CpuThreads, node_cores
from ..pipeline.stages import pixels
from .reads import FEATURES
from .settings import ProbeSettings

__all__ = ["STATE", "resolve_probe_precision", "train_loop"]

log = logging.getLogger(__name__)

#: The checkpoint's plain-JSON state (epochs done, accuracies, history, errors): what the driver reads back.
STATE = "state.json"
_WEIGHTS = "heads.pt"


def resolve_probe_precision(precision: str, device: Any) -> str:
    """``auto``: bf16 where the device multiplies bf16 natively (CUDA with bf16 support, an NPU, a CPU with
    AVX512-BF16 / AMX), else fp32; any other value is kept (a forced precision)."""
    if precision != "auto":
        return precision
    import torch

    from ..device import cpu_has_fast_low_precision

    if device.type == "cpu":
        return "bf16" if cpu_has_fast_low_precision(torch.bfloat16) else "fp32"
    supported = getattr(getattr(torch, device.type, None), "is_bf16_supported", lambda: True)
    return "bf16" if supported() else "fp32"


def _cpu_threads(requested: CpuThreads, local_workers: int) -> int:
    """A CPU worker's torch threads: ``requested`` if a number, else the node's cores shared by the workers on it
    (Ray sets 1 for a fraction). ``auto`` is the latter: training has no warm-up call to tune on."""
    if isinstance(requested, int) and requested:
        return requested
    return max(1, node_cores() // max(1, local_workers))


class _Feed:
    """Batches of a worker's dataset -> ``(features, targets)`` on its device, and the rows that failed to load."""

    def __init__(self, replica: Any, settings: ProbeSettings, device: Any, width: int) -> None:
        self.replica, self.settings, self.device, self.width = replica, settings, device, width
        self.errors: dict[str, dict[str, str]] = {}

    def batches(self, shard: Any, batch_size: int, shuffle_seed: int | None = None) -> Iterator[tuple[Any, Any]]:
        import torch

        buffer = self.settings.shuffle_buffer if shuffle_seed is not None else 0
        options = {"local_shuffle_buffer_size": buffer, "local_shuffle_seed": shuffle_seed} if buffer else {}
        # Two batches fetched ahead: the next images are decoded and moved while the device works on these.
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2, **options):
            batch = self._valid(batch)
            targets = torch.from_numpy(batch.column("target").to_numpy().astype(np.int64)).to(self.device)
            yield self._features(batch), targets

    def _valid(self, batch: pa.Table) -> pa.Table:
        if "error" not in batch.column_names:
            return batch
        failed = batch.column("error").is_valid()
        if pc.any(failed).as_py():
            for row in batch.filter(failed).select(["path", "reason", "error"]).to_pylist():
                self.errors[row["path"]] = {"reason": row["reason"], "error": row["error"]}
            batch = batch.filter(batch.column("error").is_null())
        return batch

    def _features(self, batch: pa.Table) -> Any:
        import torch

        from .heads import probe_features

        if not batch.num_rows:  # every image of the batch failed to load
            return torch.zeros((0, self.width), device=self.device)
        if FEATURES in batch.column_names:
            column = batch.column(FEATURES).combine_chunks()
            width = column.type.list_size
            values = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
            return torch.from_numpy(values).to(self.device)
        images = torch.from_numpy(pixels(batch.column("image"), self.settings.size)).to(self.device)
        return probe_features(self.replica.model, images, self.settings.max_blocks)


def train_loop(config: Mapping[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` (see the module's docstring). ``config``: ``settings``, ``model``,
    ``rope_dtype``, ``cpu_threads``, ``embed_dim``, ``num_classes``, ``config_digest``, ``shuffle_rows`` (the
    training rows come from shards / parquet / stored features: mix them in a buffer)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from .heads import LinearHeads, make_optimizer, make_schedule, train_step

    settings: ProbeSettings = config["settings"]
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(config.get("cpu_threads"), context.get_local_world_size()))
    precision = resolve_probe_precision(settings.precision, device)
    replica = None
    if settings.mode == "protocol":
        from ..replica import VTPReplica

        replica = VTPReplica(config["model"], str(device), precision, config["rope_dtype"], warmup_size=0)
        if replica.info.config_digest != config["config_digest"]:
            raise RuntimeError(f"model {config['model']!r} has another config here than on the driver")
    specs = settings.heads(workers)
    heads = LinearHeads(specs, config["embed_dim"], config["num_classes"], settings.init_std, settings.seed)
    state = _new_state(settings, precision, str(device), workers)
    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, STATE)) as f:
                state = json.load(f)
            saved = torch.load(os.path.join(directory, _WEIGHTS), map_location="cpu", weights_only=True)
        if state["settings_digest"] != settings.training_digest():
            raise RuntimeError("the checkpoint in this run's storage was made with other probe settings")
        heads.load_state_dict(saved["heads"])
        state["resumed_from"].append(state["epochs_done"])
    model = ray.train.torch.prepare_model(heads)  # to the device; DDP when there are several workers
    optimizer = make_optimizer(heads, specs, settings)
    schedule = make_schedule(optimizer, settings.iterations)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
    feed = _Feed(replica, settings, device, settings.feature_dim(config["embed_dim"]))
    say = _say if rank == 0 else (lambda *a, **k: None)
    if checkpoint is not None:
        say(f"linear-probe: resuming after epoch {state['epochs_done']} from {checkpoint.path}", flush=True)
    trained = False
    for epoch in range(state["epochs_done"], settings.epochs):
        trained = True
        model.train()
        started = time.perf_counter()
        shard = ray.train.get_dataset_shard(f"train-{epoch}-{rank}")
        # Shards, parquet files and stored features are shuffled whole: a buffer mixes their rows (image folders are
        # shuffled image by image already, and must keep their order, see data.epoch_dataset).
        mixed = config["shuffle_rows"] and settings.shuffle_buffer > 0
        seed = settings.seed * 1_000_003 + epoch * 1009 + rank if mixed else None
        total = torch.zeros((), device=device)
        steps, window_start, window_steps = 0, time.perf_counter(), 0
        for features, targets in feed.batches(shard, settings.batch_size, seed):
            lr = optimizer.param_groups[0]["lr"]
            scale = None
            if workers > 1:  # the mean over the global batch's images, however many of them each worker holds
                count = torch.tensor(float(len(targets)), device=device)
                dist.all_reduce(count)
                scale = workers / count.clamp(min=1.0)  # stays on the device: no wait for it here
            loss = train_step(model, optimizer, schedule, features, targets, scale)
            total += loss
            steps += 1
            window_steps += 1
            if steps % settings.log_every == 0 or steps == settings.epoch_length:
                rate = window_steps * settings.global_batch(workers) / (time.perf_counter() - window_start)
                say(
                    f"linear-probe epoch {epoch + 1}/{settings.epochs} iteration {steps}/{settings.epoch_length}: "
                    f"loss {loss.item():.4f}, lr {lr:.4g} (first head), "
                    f"{rate:.1f} images/s",
                    flush=True,
                )
                window_start, window_steps = time.perf_counter(), 0
        train_seconds = time.perf_counter() - started
        accuracies, evaluated, val_seconds = _evaluate(model, feed, settings, device, rank, workers)
        errors = _gather_errors(feed.errors, workers)
        mean_loss = float(total.item()) / max(steps, 1)
        _record_epoch(state, epoch, specs, accuracies, evaluated, mean_loss, steps, train_seconds, val_seconds,
                      errors, settings.global_batch(workers))  # fmt: skip
        best = state["history"][-1]
        say(
            f"linear-probe epoch {epoch + 1}/{settings.epochs} done: mean loss {mean_loss:.4f}, best top-1 "
            f"{best['best_top1']:.2f}% ({best['best_head']}) on {evaluated} val images; train {train_seconds:.1f}s, "
            f"val {val_seconds:.1f}s",
            flush=True,
        )
        _report(state, heads, optimizer, schedule, rank)
    if not trained:  # a run that was already complete: nothing to train, the latest checkpoint holds the result
        ray.train.report({"epochs_done": state["epochs_done"]})
    if workers > 1:
        dist.barrier()


def _say(line: str, **_: Any) -> None:
    """A progress line on the worker's own stdout, which Ray forwards to the driver's console (a plain ``print`` is
    patched by Ray Train to log as well: it would show twice)."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _new_state(settings: ProbeSettings, precision: str, device: str, workers: int) -> dict[str, Any]:
    return {
        "settings_digest": settings.training_digest(),
        "epochs_done": 0,
        "iterations_done": 0,
        "images_seen": 0,
        "precision": precision,
        "device": device,
        "workers": workers,
        "resumed_from": [],
        "history": [],
        "best": None,
        "accuracies": {},
        "val_images": 0,
        "train_seconds": 0.0,
        "val_seconds": 0.0,
        "errors": {},
    }


def _evaluate(
    model: Any, feed: _Feed, settings: ProbeSettings, device: Any, rank: int, workers: int
) -> tuple[Any, int, float]:
    """Every head's correct count on this worker's part of the validation set, summed over the workers."""
    import ray.train
    import torch
    import torch.distributed as dist

    from .heads import count_correct

    started = time.perf_counter()
    heads = model.module if hasattr(model, "module") else model
    heads.eval()
    correct = torch.zeros(len(heads.names), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for features, targets in feed.batches(ray.train.get_dataset_shard(f"val-{rank}"), 2 * settings.batch_size):
        correct += count_correct(heads, features, targets)
        seen += len(targets)
    if workers > 1:
        dist.all_reduce(correct)
        dist.all_reduce(seen)
    return correct.cpu().numpy(), int(seen.item()), time.perf_counter() - started


def _gather_errors(errors: dict[str, dict[str, str]], workers: int) -> dict[str, dict[str, str]]:
    if workers == 1:
        return dict(errors)
    import torch.distributed as dist

    gathered: list[Any] = [None] * workers
    dist.all_gather_object(gathered, errors)
    merged: dict[str, dict[str, str]] = {}
    for part in gathered:
        merged.update(part)
    return merged


def _record_epoch(
    state: dict[str, Any],
    epoch: int,
    specs: Any,
    correct: np.ndarray,
    evaluated: int,
    mean_loss: float,
    steps: int,
    train_seconds: float,
    val_seconds: float,
    errors: dict[str, dict[str, str]],
    global_batch: int,
) -> None:
    accuracies = {
        spec.name: (100.0 * int(c) / evaluated if evaluated else 0.0) for spec, c in zip(specs, correct, strict=True)
    }
    best_head = max(accuracies, key=accuracies.get)
    state["history"].append(
        {
            "epoch": epoch + 1,
            "mean_loss": mean_loss,
            "iterations": steps,
            "best_top1": accuracies[best_head],
            "best_head": best_head,
            "train_seconds": round(train_seconds, 3),
            "val_seconds": round(val_seconds, 3),
            "images_per_s": round(steps * global_batch / train_seconds, 3) if train_seconds else None,
            "resumed_from": state["resumed_from"][-1] if state["resumed_from"] else None,
        }
    )
    # Upstream's best: the best head of the best epoch, kept over the run (its results' best_accuracy).
    if state["best"] is None or accuracies[best_head] > state["best"]["top1"]:
        state["best"] = {"top1": accuracies[best_head], "head": best_head, "epoch": epoch + 1}
    state["accuracies"] = accuracies
    state["val_images"] = evaluated
    state["epochs_done"] = epoch + 1
    state["iterations_done"] += steps
    state["images_seen"] += steps * global_batch
    state["train_seconds"] += train_seconds
    state["val_seconds"] += val_seconds
    state["errors"].update(errors)


def _report(state: dict[str, Any], heads: Any, optimizer: Any, schedule: Any, rank: int) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train
    import torch

    metrics = {k: state[k] for k in ("epochs_done", "iterations_done", "images_seen", "best")}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            weights = {"heads": heads.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save({**weights, "schedule": schedule.state_dict()}, os.path.join(directory, _WEIGHTS))
            with open(os.path.join(directory, STATE), "w") as f:
                json.dump(state, f)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{state['epochs_done']:04d}")
