"""``vtp-ray eval --task linear-probe``: the driver (no torch here).

::

    train / val inputs -> data.find_probe_sets (classes; shard samples counted by Ray tasks)
    [fast mode: features.extract_features -> DIR/features/{train,val}/part-*.parquet, once]
    datasets: "train-<e>-<rank>" (data.epoch_dataset: worker rank's part of epoch e of the endless shuffled
              stream) for every epoch and worker, "val-<rank>" (data.validation_dataset: its part of the val set)
    TorchTrainer(worker.train_loop, ScalingConfig: one worker per accelerator, TorchConfig: hccl / nccl / gloo,
                 RunConfig(name, storage_path=DIR, FailureConfig(max_failures)))     (fit in a 0-CPU Ray task:
                 ray.train.torch imports torch, the driver never does)
    -> the latest checkpoint's state.json -> DIR/report.json (vtp-ray's eval report, task linear-probe) and
       DIR/linear_probing_results.json (upstream's results: best_accuracy, best_classifier, all_accuracies)

``DIR`` is the run's Ray Train storage: checkpoints of the heads and their optimizer after every epoch, in
``DIR/<run name>``. Running the same command again resumes from the latest one, as does Ray Train itself when a
worker fails (up to ``max_failures`` times). With workers on several nodes ``DIR`` must be storage every node
reaches at the same path (NFS, or a mounted bucket): Ray Train uploads each checkpoint there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..pipeline.report import REPORT, run_header
from ..pipeline.runner import Placement, ray_session
from ..pipeline.spec import ModelFacts, PipelineSpec
from ..placement import cluster_nodes
from .data import ProbeSet, block_rows_for, epoch_dataset, find_probe_sets, validation_dataset
from .placement import WorkerPlacement, worker_placement
from .settings import ProbeSettings
from .worker import STATE

__all__ = ["RESULTS", "RUN_FILE", "TASK", "linear_probe"]

log = logging.getLogger(__name__)

TASK = "linear-probe"
#: Upstream's results file name and shape.
RESULTS = "linear_probing_results.json"
#: What identifies a run in its storage: a re-run must match it to resume.
RUN_FILE = "probe_run.json"
PROTOCOLS = {
    "protocol": "upstream VTP's linear probe (tools/test_linear_probing_hf.py, DINOv2-style): a trunk pass per "
    "augmented training image",
    "fast": "NOT upstream's protocol: fast mode, features extracted once per image without augmentation (resize + "
    "center crop), heads trained on the stored features",
}


def linear_probe(
    train: Sequence[str],
    val: Sequence[str],
    output: str | os.PathLike[str],
    spec: PipelineSpec,
    settings: ProbeSettings,
    *,
    num_classes: int | None = None,
    max_failures: int = 3,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and evaluate the linear heads of ``spec.model`` on ``train`` / ``val`` (see the module's docstring).

    ``spec`` gives the model, the placement (``resources`` per worker, ``replicas`` = workers, default one per
    accelerator), limits and sample options (its ``precision`` and ``size`` are ``settings``'); ``settings`` the
    protocol. ``output`` is the run's storage; an unfinished run there resumes (``overwrite``
    starts over). Returns the report (also ``output/report.json``).
    """
    started = time.perf_counter()
    out = Path(output).expanduser().resolve()
    if os.path.exists(spec.model):  # the workers' working directory is not this one
        spec = replace(spec, model=os.path.abspath(spec.model))
    model = ModelFacts.of(spec.model, settings.size)
    embed_dim, depth = _trunk_shape(spec.model)
    if settings.max_blocks > depth:
        raise ValueError(f"n_last_blocks {list(settings.n_last_blocks)}: the model has {depth} blocks")
    name = "linear-probe" if settings.mode == "protocol" else "linear-probe-fast"
    with ray_session(spec.address, spec.dashboard), _progress_bars(spec.progress):
        import ray

        placement = worker_placement(spec.resources, spec.replicas, cluster_nodes(), spec.preprocess_cpus)
        identity = {
            "settings": {k: v for k, v in settings.to_dict().items() if k != "log_every"},
            "model": {"spec": model.spec, "config_digest": model.config_digest},
            "train": list(map(str, train)),
            "val": list(map(str, val)),
            "workers": placement.workers,
            "num_classes": num_classes,
        }
        train_set, val_set, classes = find_probe_sets(
            train, val, spec.samples, filesystem=spec.filesystem, num_classes=num_classes,
            preprocess_cpus=spec.preprocess_cpus,
        )  # fmt: skip
        _claim_storage(out, name, identity, overwrite)  # only now: inputs that cannot be read leave nothing behind
        extraction: dict[str, Any] = {}
        if settings.mode == "fast":
            from .features import extract_features

            train_set, val_set, extraction = extract_features(
                train_set, val_set, out / "features", spec, settings, model, identity
            )
        cpus = ray.cluster_resources().get("CPU", 1)
        common = {
            "limits": spec.preprocessing.limits,
            "preprocess_cpus": spec.preprocess_cpus,
            "filesystem": spec.filesystem,
        }
        workers = placement.workers
        train_rows = block_rows_for(settings.epoch_length * settings.batch_size, settings.size, cpus / workers,
                                    spec.preprocess_cpus)  # fmt: skip
        val_rows = block_rows_for(val_set.total // workers, settings.size, cpus / workers, spec.preprocess_cpus)
        datasets = {
            f"train-{e}-{r}": epoch_dataset(train_set, settings, e, r, workers, block_rows=train_rows, **common)
            for e in range(settings.epochs)
            for r in range(workers)
        }
        for r in range(workers):
            datasets[f"val-{r}"] = validation_dataset(val_set, settings, r, workers, block_rows=val_rows, **common)
        loop_config = {
            "settings": settings,
            "model": spec.model,
            "rope_dtype": spec.rope_dtype,
            "cpu_threads": spec.cpu_threads,
            "embed_dim": embed_dim,
            "num_classes": len(classes),
            "config_digest": model.config_digest,
            "shuffle_rows": train_set.kind != "files",
        }
        # Ray Train reads its RAY_TRAIN_* settings in the process that builds the trainer: that of the launcher task.
        # Its V2 (Ray 2.60's default) is the one that resumes a run from its name and storage path.
        env = {"RAY_TRAIN_V2_ENABLED": "1", **{k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}}
        fit = ray.remote(num_cpus=0, max_retries=0)(_fit).options(runtime_env={"env_vars": env})
        launched = fit.remote(loop_config, datasets, placement, str(out), name, max_failures, spec.progress)
        try:
            # Waited on in steps, with Ctrl-C as a flag: the interrupt then always ends this wait within a second.
            with interrupt_flag() as interrupted:
                while not ray.wait([launched], timeout=1.0)[0]:
                    if interrupted.is_set():
                        raise KeyboardInterrupt
            checkpoint = ray.get(launched)
        except KeyboardInterrupt:
            # Stop the training now (its controller and workers go with the task), not when Ray notices that this
            # driver is gone: a re-run continues from the latest checkpoint in any case.
            ray.cancel(launched, force=True)
            raise
    state = _read_state(checkpoint)
    report = _report(train, val, out, name, spec, settings, model, placement, state, classes, train_set, val_set,
                     extraction, time.perf_counter() - started)  # fmt: skip
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    upstream = {"best_accuracy": report["metrics"]["top1"], "best_classifier": report["best_head"],
                "all_accuracies": state["accuracies"]}  # fmt: skip
    (out / RESULTS).write_text(json.dumps(upstream, indent=2) + "\n")
    return report


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """SIGINT sets the yielded event instead of raising ``KeyboardInterrupt`` (main thread only; elsewhere the event
    stays unset and Python's handler is kept). Ray's blocking calls run Python's signal handlers from C++ and turn a
    ``KeyboardInterrupt`` into a status that ``ray.wait`` can drop: an interrupted driver then kept waiting (seen
    now and then in the interrupted probe test, on 2 cores). A handler that raises nothing cannot be lost that
    way."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        # None: the handler was not set from Python and cannot be put back; Python's default then.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Ray Data's progress bars on or off for the datasets made inside (each dataset keeps a copy of the context)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = enabled
    try:
        yield
    finally:
        context.enable_progress_bars = before


def _trunk_shape(model: str) -> tuple[int, int]:
    from ..model.source import read_spec

    config = read_spec(model).config
    return config.vision_embed_dim, config.vision_depth


def _claim_storage(out: Path, name: str, identity: dict[str, Any], overwrite: bool) -> None:
    """Record what run ``out`` holds; a different run there is an error (unless ``overwrite``: it is deleted)."""
    run_file = out / RUN_FILE
    if overwrite:
        for path in (out / name, out / "features", run_file, out / REPORT, out / RESULTS):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if run_file.exists():
        held, wanted = json.loads(run_file.read_text()), json.loads(json.dumps(identity))
        if held != wanted:
            changed = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise ValueError(
                f"{out} holds a linear probe run with other {', '.join(changed)}: use another --output, or "
                "--overwrite to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=2) + "\n")


def _fit(
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    placement: WorkerPlacement,
    storage: str,
    name: str,
    max_failures: int,
    progress: bool,
) -> str:
    """Build and fit the ``TorchTrainer`` (in a Ray task: ``ray.train.torch`` imports torch). Returns the latest
    checkpoint's path."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import train_loop

    DataContext.get_current().enable_progress_bars = progress
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=placement.workers, use_gpu=placement.use_gpu, resources_per_worker=placement.resources
        ),
        torch_config=TorchConfig(backend=placement.backend),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets=datasets,
        # Each worker has datasets of its own (its part of each epoch, of the val set): none is split by Ray Data,
        # and each is read in plan order, so that a worker's batches are the same in every run.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("the linear probe finished without a checkpoint")
    return result.checkpoint.path


def _read_state(checkpoint: str) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE).read_text())


def _report(
    train: Sequence[str],
    val: Sequence[str],
    out: Path,
    name: str,
    spec: PipelineSpec,
    settings: ProbeSettings,
    model: ModelFacts,
    placement: WorkerPlacement,
    state: dict[str, Any],
    classes: list[str],
    train_set: ProbeSet,
    val_set: ProbeSet,
    extraction: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    replica_placement = Placement(placement.to_dict()["resources_per_worker"], state["device"], placement.workers)
    header_spec = replace(spec, precision=state["precision"])
    errors = [*train_set.excluded, *val_set.excluded, *extraction.get("errors", [])]
    errors += [{"path": path, **error} for path, error in sorted(state["errors"].items())]
    heads = {h.name: {"n_last_blocks": h.n_last_blocks, "base_lr": h.base_lr, "lr": h.lr,
                      "top1": state["accuracies"].get(h.name)} for h in settings.heads(placement.workers)}  # fmt: skip
    last = max(state["accuracies"].values()) if state["accuracies"] else None
    return {
        **run_header([*train, *val], model, header_spec, replica_placement),
        "task": TASK,
        "mode": settings.mode,
        "protocol": PROTOCOLS[settings.mode],
        "train_inputs": list(map(str, train)),
        "val_inputs": list(map(str, val)),
        "preprocessing": {
            "train": f"RandomResizedCrop({settings.size}, scale={list(settings.crop_scale)}, ratio="
            f"{[round(r, 6) for r in settings.crop_ratio]}, bicubic) + horizontal flip (p=0.5)"
            if settings.mode == "protocol"
            else f"Resize({settings.resize_size}, bicubic) + CenterCrop({settings.size}), once",
            "val": f"Resize({settings.resize_size}, bicubic) + CenterCrop({settings.size})",
            "normalization": "ImageNet mean / std",
        },
        "settings": settings.to_dict(),
        "global_batch_size": settings.global_batch(placement.workers),
        "workers": placement.to_dict(),
        "classes": len(classes),
        "source": {"train": train_set.description(), "val": val_set.description()},
        "metric_definitions": {
            "top1": "upstream's best_accuracy: percent of validation images the best head classifies right, at the "
            "best epoch (every head is evaluated after every epoch)",
            "top1_last_epoch": "the best head's top-1 after the last epoch",
        },
        "counts": {
            "train_samples": train_set.total,
            "val_samples": val_set.total,
            "evaluated": state["val_images"],
            "images_seen": state["images_seen"],
            "iterations": state["iterations_done"],
            "errors": len(errors),
            "errors_by_reason": dict(Counter(e["reason"] for e in errors)),
        },
        "metrics": {"top1": state["best"]["top1"] if state["best"] else None, "top1_last_epoch": last},
        "best_head": state["best"]["head"] if state["best"] else None,
        "best_epoch": state["best"]["epoch"] if state["best"] else None,
        "heads": heads,
        "history": state["history"],
        "resumed_from": state["resumed_from"],
        **({"feature_extraction": {k: v for k, v in extraction.items() if k != "errors"}} if extraction else {}),
        "storage": {"path": str(out), "run": name},
        "skipped_metrics": {},
        "errors": errors,
        "seconds": round(seconds, 3),
        "train_seconds": round(state["train_seconds"], 3),
        "val_seconds": round(state["val_seconds"], 3),
        "images_per_s": round(state["images_seen"] / state["train_seconds"], 3) if state["train_seconds"] else 0.0,
    }
