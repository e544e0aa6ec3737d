"""Running a pipeline on Ray: the session, the placement of the replica pool, the dataset, and its outputs.

Every job builds the same dataset::

    source (driver)   ->  read + preprocess (CPU tasks)  ->  model stage (actors)         ->  driver
    ``Source``            ``Source.read``: one task per      ``replica_stage``: a pool of      the job's writer
                          block of many model batches        ``worker.ModelStage`` actors,
                                                             one call per block, split into
                                                             model batches

``run_pipeline`` yields the output batches in a Ray session; the job's writer consumes them on the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from .priority import CpuPriority, each_at_priority
from .served import ServedApp, ServedModelChanged, connect
from .spec import ModelFacts, PipelineSpec, task_pool
from .worker import served_stage

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "Placement",
    "ReplicaStartError",
    "ReplicaUsage",
    "Source",
    "actor_options",
    "ray_session",
    "replica_stage",
    "run_pipeline",
]

log = logging.getLogger(__name__)

_ACTOR_OPTION_KEYS = frozenset({"resources", "num_gpus", "num_cpus", "memory", "accelerator_type"})
#: Ray CPUs of each task (or actor) that sends blocks to a Serve app: it mostly waits for the app's answers.
SERVED_STAGE_CPUS = 0.25


class ReplicaStartError(ValueError):
    """The model replicas failed in their constructor: a wrong model, device or precision for the workers."""


class Source(Protocol):
    """What a pipeline reads: ``sources.Inputs`` (loose files), a ``sources.SampleSource`` (samples in tar shards or
    parquet files), or a job's own (the decode job's latents)."""

    def read(self, spec: PipelineSpec, cpus: float) -> Dataset:
        """The Ray Data read of this source and its preprocess stage (``cpus``: the cluster's): the rows the model
        stage takes, ``reason`` / ``error`` saying why a row cannot reach the model."""
        ...


@dataclass(frozen=True)
class Placement:
    """Where the model stage runs: Ray actor options per actor, its device, the pool size; on a Serve app, the app
    (the actors are then small CPU actors that send the blocks to the app's model replicas)."""

    options: dict[str, Any]
    device: str
    replicas: int | tuple[int, int]
    served: ServedApp | None = None

    @classmethod
    def on_app(cls, spec: PipelineSpec, served: ServedApp) -> Placement:
        """One small CPU task (or actor) per block in flight: one per running model replica of the app, unless told."""
        options = {"num_cpus": SERVED_STAGE_CPUS}
        if _canonical(options) == _canonical({"num_cpus": spec.preprocess_cpus}):
            options = {"num_cpus": SERVED_STAGE_CPUS / 2}  # never fused into the preprocess tasks
        return cls(options, "cpu", spec.serve.calls if spec.serve and spec.serve.calls else served.replicas, served)

    @classmethod
    def resolve(cls, spec: PipelineSpec) -> Placement:
        """The placement of ``spec`` on the connected cluster; fails fast if it can never fit."""
        import ray

        from ..placement import PlacementError, cluster_nodes, device_for, resolve_placement

        cluster = ray.cluster_resources()
        options = resolve_placement(actor_options(spec.resources), cluster_nodes(), setting="--resources")
        device = device_for(options) if spec.device == "auto" else spec.device
        replicas = spec.replicas or _default_replicas(options, cluster)
        if _canonical(options) == _canonical({"num_cpus": spec.preprocess_cpus}):
            raise ValueError(
                f"preprocess_cpus={spec.preprocess_cpus} equals the replicas' {options}: Ray Data would fuse "
                "preprocessing into the model actors; choose another value"
            )
        min_replicas = replicas if isinstance(replicas, int) else replicas[0]
        needed = min_replicas * float(options.get("num_cpus") or 0) + spec.preprocess_cpus
        if needed > cluster.get("CPU", 0):
            raise PlacementError(
                f"{min_replicas} replica(s) with {options} and preprocessing ({spec.preprocess_cpus} CPU per task) "
                f"need {needed:g} CPUs, the cluster has {cluster.get('CPU', 0):g}: lower --replicas, or give Ray more "
                "logical CPUs (ray start --num-cpus N; they may exceed the cores)"
            )
        return cls(options, device, replicas)

    @property
    def model_device(self) -> str:
        """Where the model runs: the pool's device, or the app's replicas' on a Serve app."""
        return str(self.served.info.get("device", self.device)) if self.served else self.device

    def to_dict(self) -> dict[str, Any]:
        placed = {"replica_options": self.options, "device": self.model_device, "replica_pool": self.replicas}
        return {**placed, "serve_app": self.served.to_dict()} if self.served else placed


def actor_options(resources: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """``PipelineSpec.resources`` as ``resolve_placement`` takes it: a name (``auto``, ``npu``, ...) as it is,
    ``{"NPU": 1}`` (Ray resources per replica) as Ray actor options, Ray actor options as they are."""
    if isinstance(resources, str):
        return resources
    if set(resources) <= _ACTOR_OPTION_KEYS:
        return dict(resources)
    options: dict[str, Any] = {}
    custom = {}
    for key, value in resources.items():
        if key == "CPU":
            options["num_cpus"] = value
        elif key == "GPU":
            options["num_gpus"] = value
        else:
            custom[key] = value
    if custom:
        options["resources"] = custom
    return options


def _default_replicas(options: Mapping[str, Any], cluster: Mapping[str, float]) -> int:
    """One replica per accelerator the cluster has for this placement, else one."""
    wanted = {k: float(v) for k, v in (options.get("resources") or {}).items() if v}
    if options.get("num_gpus"):
        wanted["GPU"] = float(options["num_gpus"])
    if not wanted:
        return 1
    return max(1, min(int(cluster.get(k, 0) // v) for k, v in wanted.items()))


def _canonical(options: Mapping[str, Any]) -> tuple[Any, ...]:
    """What Ray Data compares to decide whether two map stages fuse (CPUs default to 1)."""
    resources = {k: float(v) for k, v in (options.get("resources") or {}).items() if v}
    cpus, gpus = float(options.get("num_cpus") or 1), float(options.get("num_gpus") or 0)
    return cpus, gpus, resources, options.get("memory"), options.get("accelerator_type")


# ------------------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool = False) -> Iterator[None]:
    """Use the Ray this process is connected to; else join ``address`` (or ``RAY_ADDRESS``) or start an embedded
    local Ray (with its dashboard only if asked): never, silently, a cluster some earlier ``ray start`` on this
    machine left behind."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"include_dashboard": dashboard} if address == "local" else {}
    ray.init(address=address, logging_level=logging.WARNING, **local)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = enabled
    try:
        yield
    finally:
        context.enable_progress_bars = before


def replica_stage(
    preprocessed: Dataset,
    spec: PipelineSpec,
    placement: Placement,
    worker: type,
    worker_kwargs: Mapping[str, Any],
    expected: Mapping[str, Any],
) -> Dataset:
    """The model stage of every job: a pool of ``worker`` actors (a ``worker.ModelStage`` subclass, built with
    ``spec``, the placement's device, the ``expected`` model identity, the Serve app if any, and ``worker_kwargs``)
    that take whole blocks of ``preprocessed`` and split them into model batches. On a Serve app, a stage that
    allows it (``served_in_tasks``) runs in a pool of tasks instead, one per block in flight (``served_stage``)."""
    import ray

    constructor_kwargs = {
        "spec": spec,
        "device": placement.device,
        "expected": dict(expected),
        "served": placement.served,
        **worker_kwargs,
    }
    if placement.served is not None and worker.served_in_tasks:
        return preprocessed.map_batches(
            served_stage(worker),
            batch_format="pyarrow",
            batch_size=None,
            **task_pool(placement.replicas),
            fn_kwargs={"key": uuid.uuid4().hex, "stage_kwargs": constructor_kwargs, "priority": spec.job_cpu_priority},
            **placement.options,
        )
    if placement.served is not None:  # the progress bar names the stage after the class: say it runs on the app
        worker = type(f"{worker.__name__}OnServeApp", (worker,), {"__module__": worker.__module__})

    replicas = placement.replicas
    pool = (
        ray.data.ActorPoolStrategy(size=replicas)
        if isinstance(replicas, int)
        else ray.data.ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1])
    )
    return preprocessed.map_batches(
        worker,
        batch_format="pyarrow",
        batch_size=None,  # whole blocks: the worker splits them into model batches
        compute=pool,
        fn_constructor_kwargs=constructor_kwargs,
        **placement.options,
    )


@contextlib.contextmanager
def run_pipeline(
    spec: PipelineSpec,
    source: Source,
    worker: type,
    model: ModelFacts,
    worker_kwargs: Mapping[str, Any] | None = None,
    prepare: Callable[[Placement], Mapping[str, Any]] | None = None,
    then: Callable[[Dataset, float], Dataset] | None = None,
) -> Iterator[tuple[Placement, Iterator[pa.Table]]]:
    """In a Ray session: ``(placement, output batches)`` of ``source`` through ``worker`` replicas of ``model``
    (or, with ``spec.serve``, through a running Serve app's, checked to serve ``model`` before anything is read).

    Iterating the batches raises ``ReplicaStartError`` with one clear line when the replicas fail in their
    constructor (a wrong model, device or precision for the workers), ``ServedModelChanged`` when the app starts
    serving another model mid-job. ``prepare`` (called with the placement, in the Ray session, before the workers
    start) returns more worker arguments: what a job computes once for all its workers. ``then`` (called with the
    model stage's dataset and the cluster's CPUs) adds a stage after the model's, whose rows are the ones yielded:
    CPU work on the outputs that the driver alone would be too slow for.
    """
    import ray

    expected = model.identity(spec)
    with ray_session(spec.address, spec.dashboard), _progress_bars(spec.progress):
        if spec.serve is not None:
            served = connect(spec.serve, expected)
            placement = Placement.on_app(spec, served)
            log.info("running on Serve app %r (%s, %d replicas) at batch priority", served.target.app,
                     served.deployment, served.replicas)  # fmt: skip
        else:
            placement = Placement.resolve(spec)
        kwargs = {**(worker_kwargs or {}), **(prepare(placement) if prepare else {})}
        cpus = ray.cluster_resources().get("CPU", 1)
        dataset = replica_stage(source.read(spec, cpus), spec, placement, worker, kwargs, expected)
        if then is not None:
            dataset = then(dataset, cpus)
        yield placement, _outputs(dataset, spec.job_cpu_priority)


def _outputs(dataset: Dataset, priority: CpuPriority) -> Iterator[pa.Table]:
    # At a lowered priority, Ray Data's executor on the driver is too: its threads start in the lowered thread.
    batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        yield from each_at_priority(batches, priority)
    except Exception as e:
        if (changed := _cause(e, ServedModelChanged)) is not None:
            raise ServedModelChanged(str(changed)) from e
        if (reason := _replica_start_failure(e)) is None:
            raise
        raise ReplicaStartError(f"the model replicas could not start: {reason}") from e


def _cause(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``error``'s chain (Ray wraps a task's exception as its ``cause``)."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def _replica_start_failure(error: BaseException) -> str | None:
    """The last line of a replica constructor's error (``Type: message``) when ``error`` comes from one."""
    from ray.exceptions import RayActorError

    while error is not None:
        if isinstance(error, RayActorError) and error.actor_init_failed:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            return lines[-1] if lines else str(error)
        error = error.__cause__ or error.__context__
    return None


class ReplicaUsage:
    """Counts the driver keeps while output batches arrive: inputs done, rows and model seconds per replica."""

    def __init__(self) -> None:
        self.processed = 0
        self.rows: Counter[str] = Counter()  # rows (not errors) per replica
        self.busy: Counter[str] = Counter()  # seconds in the model per replica
        self.compiled = 0  # rows whose model calls all ran compiled graphs
        self._first_output: tuple[float, int] | None = None  # (time, inputs) of the first batch

    def add(self, batch: pa.Table) -> None:
        if self._first_output is None:
            self._first_output = (time.perf_counter(), batch.num_rows)
        self.processed += batch.num_rows
        ok = batch.filter(batch.column("error").is_null())
        self.rows.update(ok.column("replica").to_pylist())
        self.compiled += ok.filter(ok.column("compiled")).num_rows if "compiled" in ok.column_names else 0
        for row in batch.group_by("replica").aggregate([("model_seconds", "sum")]).to_pylist():
            self.busy[row["replica"]] += row["model_seconds_sum"]

    def stats(self) -> dict[str, Any]:
        """Counts and rates; "warm" counts from the first output on, when the model replicas are up."""
        stats: dict[str, Any] = {
            "processed": self.processed,
            "replicas": dict(self.rows),
            # Against the run's seconds: a replica mostly idle is starved of input (preprocessing, storage).
            "replica_model_s": {name: round(seconds, 3) for name, seconds in self.busy.items()},
            # never a silent fallback: how many rows ran compiled graphs, how many eagerly (compiling, over the cap)
            "compiled_rows": self.compiled,
            "eager_rows": sum(self.rows.values()) - self.compiled,
        }
        if self._first_output and self.processed > self._first_output[1]:
            warm_s = time.perf_counter() - self._first_output[0]
            stats["warm_images_per_s"] = round((self.processed - self._first_output[1]) / warm_s, 3)
        return stats
