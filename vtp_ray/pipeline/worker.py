"""``ModelStage``: the class every job's model stage (its "worker") derives from, run as Ray Data actors.

On a Serve app a light stage (``served_in_tasks``) runs in Ray Data tasks instead (``served_stage``): it holds no
model, and a task's worker process outlives the job, so the next job on the app finds it started and Ray Serve's
client imported, where a new actor takes 1.5-2.5 s to start before the first block can go (the most of a small job's
fixed cost on a warm app).

A stage holds one replica: a ``VTPReplica`` (built once per actor, checked against the model identity the driver read),
or, when the job runs on a Serve app, a ``served.ServedReplica`` with the same verbs. It splits each block it is
called with into model batches of ``spec.batch_size`` rows (on an app, the whole block is one call: the app's
replicas form their own model calls), hands the valid rows of each batch to the job's ``process`` as one array
(``inputs``: the preprocessed pixels by default), and lets the job turn the result into columns. Error rows pass
through untouched and never reach the model. Every output row also says which replica made it and the time its
model work took, which the driver reports per replica (``ReplicaUsage``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from ..cpu_threads import CpuThreads, node_cores
from ..outputs import identity_differences
from ..placement import brief_openmp_waits
from .priority import job_priority, lower_this_thread
from .served import ServedApp, ServedReplica
from .spec import PipelineSpec
from .stages import pixels, valid_rows

__all__ = ["ModelStage", "replica_cpu_threads", "replica_label", "served_stage"]


class ModelStage:
    """Base class of the model stage: subclasses implement ``process`` and ``columns`` (and ``inputs`` when the
    model input is not the preprocessed image).

    Args:
        spec: the run's settings.
        device: the device the placement gives (``npu:0``, ``cuda:0``, ``cpu``).
        expected: the model identity the driver read (``ReplicaInfo.identity``); another one here is an error (e.g.
            a different checkpoint at the same path on this node).
        served: the Serve app to run on (``served.connect``'s answer), or None for a replica of the actor's own.
    """

    #: On a Serve app, run in Ray Data tasks (``served_stage``), not actors: for stages whose own state is cheap to
    #: build and small to keep (a task's process keeps it until its next job on an app).
    served_in_tasks: ClassVar[bool] = True

    def __init__(
        self, spec: PipelineSpec, device: str, expected: dict[str, Any], served: ServedApp | None = None
    ) -> None:
        brief_openmp_waits(device)
        self.spec = spec
        if served is not None:
            # An actor's thread (its process ends with the job), or a task's already lowered one (``served_stage``)
            lower_this_thread(spec.job_cpu_priority)
            self.replica: Any = ServedReplica(served, expected)
            self._label = None
            return
        from ..replica import VTPReplica

        self.replica = VTPReplica(
            spec.model,
            device,
            spec.precision,
            spec.rope_dtype,
            warmup_size=spec.preprocessing.size,
            cpu_threads=replica_cpu_threads(spec.cpu_threads, device),
            compile=spec.compile,
            compile_cache=spec.compile_cache,
            compile_max_batch=spec.batch_size,
            cuda_graphs=spec.cuda_graphs,
        )
        differences = identity_differences(expected, self.replica.info.identity())
        if differences:
            raise RuntimeError(f"model {spec.model!r} differs here from what the driver read: {'; '.join(differences)}")
        on_cpu = self.replica.info.device_type == "cpu"
        self._label = replica_label(self.replica.info.device, self.replica.cpu_threads if on_cpu else None)

    @property
    def label(self) -> str:
        """Who computes this actor's rows, in run stats: this actor's replica, or the app replica that answered."""
        return self._label or self.replica.label

    def inputs(self, rows: pa.Table) -> np.ndarray:
        """The model input of the valid rows: by default their preprocessed images, uint8 ``(n, size, size, 3)``."""
        return pixels(rows.column("image"), self.spec.preprocessing.size)

    def process(self, images: np.ndarray, rows: pa.Table) -> Any:
        """The model work on the valid rows: ``images`` uint8 ``(n, size, size, 3)``, ``rows`` their table rows."""
        raise NotImplementedError

    def columns(self, batch: pa.Table, valid: np.ndarray, result: Any | None) -> pa.Table:
        """The output table of ``batch`` given ``process``'s result (None when no row is valid)."""
        raise NotImplementedError

    def __call__(self, block: pa.Table) -> pa.Table:
        """One block (many model batches: Ray Data's cost is per call) -> its output rows, in order."""
        size = block.num_rows if isinstance(self.replica, ServedReplica) else self.spec.batch_size
        return pa.concat_tables([self._batch(block.slice(i, size)) for i in range(0, block.num_rows, size)])

    def _batch(self, batch: pa.Table) -> pa.Table:
        valid = valid_rows(batch)
        started = time.perf_counter()
        calls_before = self._compiled_and_eager_calls()
        result = None
        if valid.any():
            rows = batch if valid.all() else batch.filter(pa.array(valid))
            result = self.process(self.inputs(rows), rows)
        seconds = time.perf_counter() - started
        compiled, eager = (a - b for a, b in zip(self._compiled_and_eager_calls(), calls_before, strict=True))
        ran_compiled = self.replica.runs_compiled if self._label is None else bool(compiled and not eager)
        out = self.columns(batch, valid, result)
        out = out.append_column("replica", pa.repeat(pa.scalar(self.label), batch.num_rows))
        out = out.append_column("compiled", pa.repeat(pa.scalar(ran_compiled), batch.num_rows))
        return out.append_column("model_seconds", pa.array(np.where(valid, seconds / max(valid.sum(), 1), 0.0)))

    def _compiled_and_eager_calls(self) -> tuple[int, int]:
        """This replica's graph calls so far that ran compiled and eagerly, CUDA graphs' replays counted by what they
        recorded (a Serve app's: what its info says)."""
        info = self.replica.info
        status, graphs = info.compile, info.cuda_graphs
        if status is None:
            return 0, 0
        compiled, eager = status.compiled_calls, sum(status.eager_calls.values())
        if graphs is not None:
            compiled += graphs.compiled_replays
            eager += graphs.replays - graphs.compiled_replays
        return compiled, eager


#: This process's model stage of the job on a Serve app it last ran a block of: ``{job key: stage}``.
_SERVED_STAGES: dict[str, ModelStage] = {}


@job_priority
def _served_block(block: pa.Table, *, stage: type[ModelStage], key: str, stage_kwargs: dict[str, Any]) -> pa.Table:
    worker = _SERVED_STAGES.get(key)
    if worker is None:
        _SERVED_STAGES.clear()  # another job's: it has ended, or runs its blocks in other processes
        worker = _SERVED_STAGES[key] = stage(**stage_kwargs)
    return worker(block)


def served_stage(stage: type[ModelStage]) -> Callable[..., pa.Table]:
    """The Ray Data task function of ``stage`` on a Serve app: called with a key of the job, its ``stage_kwargs``
    and the job's CPU ``priority``, it builds the stage once per process and job (in the thread at that priority,
    as it runs each block), and returns the block's output rows. Named ``<stage>OnServeApp``: the progress bar names
    the stage after it."""

    def run(block: pa.Table, **kwargs: Any) -> pa.Table:
        return _served_block(block, stage=stage, **kwargs)

    run.__name__ = run.__qualname__ = f"{stage.__name__}OnServeApp"
    return run


def replica_label(device: str, cpu_threads: int | None = None) -> str:
    """Who this actor is in run stats: host:pid, Ray node (id prefix), device (on a CPU, with its torch threads) and
    the accelerator ids Ray gave it."""
    import ray

    context = ray.get_runtime_context()
    accelerators = {k: v for k, v in context.get_accelerator_ids().items() if v}
    ids = "".join(f" {kind} {','.join(map(str, v))}" for kind, v in sorted(accelerators.items()))
    threads = f" ({cpu_threads} torch thread{'s' * (cpu_threads != 1)})" if cpu_threads else ""
    return f"{socket.gethostname()}:{os.getpid()} node {context.get_node_id()[:8]} {device}{threads}{ids}"


def replica_cpu_threads(cpu_threads: CpuThreads, device: str) -> CpuThreads:
    """What a job's ``VTPReplica`` gets as ``cpu_threads``: a number as given; on a CPU, otherwise, the node's cores
    to start from (set here as torch's count: inside a Ray actor torch would follow ``num_cpus``, usually 1), with
    ``auto`` kept so that the replica keeps only the threads that pay at warm-up (``vtp_ray.cpu_threads``)."""
    if isinstance(cpu_threads, int) or not device.startswith("cpu"):
        return cpu_threads
    import torch

    torch.set_num_threads(node_cores())
    return cpu_threads or torch.get_num_threads()
