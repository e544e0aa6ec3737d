"""The settings every Ray Data job over images shares (``PipelineSpec``: ``Preprocessing``, ``SampleOptions``, batching,
placement) and the model facts read from a config (``ModelFacts``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from ..cpu_threads import CpuThreads, check_cpu_threads
from ..images import PATCH_SIZE, CropMode, ImageLimits, ImageSource, preprocess_with_info
from ..options import CROPS, ROPE_DTYPES, check_compile_mode, check_precision
from ..outputs import model_identity
from .priority import CPU_PRIORITIES, CpuPriority
from .served import ServeTarget

__all__ = ["ModelFacts", "PipelineSpec", "Preprocessing", "SampleOptions"]


@dataclass(frozen=True)
class Preprocessing:
    """How an input's file bytes become the model input: load (``images``, within ``limits``), then crop.

    Args:
        size: the side of the square model input, a multiple of the patch size.
        crop: ``center`` (ADM's center crop) or ``resize``.
        limits: loader limits; inputs over them become error rows.
        fast: "fast preprocess": load JPEGs at a reduced scale where the center crop allows it
            (``images.preprocess``'s ``draft``): faster on large photos, not the exact ADM pixels.
    """

    size: int = 256
    crop: CropMode = "center"
    limits: ImageLimits = field(default_factory=ImageLimits)
    fast: bool = False

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
            raise ValueError(f"size must be a positive multiple of {PATCH_SIZE}, got {size!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {self.crop!r}")

    def apply(self, data: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        """``(uint8 (size, size, 3) pixels, the original (width, height))`` of one encoded image or path."""
        return preprocess_with_info(data, self.size, self.crop, self.limits, self.fast)


@dataclass(frozen=True)
class SampleOptions:
    """How samples inside shards and parquet files are read.

    Args:
        image_keys: webdataset member extensions tried in order for the image; for parquet, the image column
            (default: the first of ``image``, ``jpg``, ``jpeg``, ``png``, ``webp``, ``img`` present).
        key: the parquet column holding each sample's key (unique within its file).
        label: webdataset: a member extension (``cls``) or ``json:FIELD``; parquet: a column. Default: ``cls``
            / ``label`` when present.
        caption: keep a text caption as the ``caption`` column: a member extension (``txt``) or a column.
        class_ids: the label must be an integer class index (ImageNet shards store 0..999 in ``cls``); the
            ``label`` column then holds it in canonical form, and a sample without a valid one is an error row
            (``no_label`` / ``bad_label``). Set by the jobs that need classes (zero-shot, lightningdit).
        num_classes: with ``class_ids``, the indices must also be below this.
    """

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    key: str = "key"
    label: str | None = None
    caption: str | None = None
    class_ids: bool = False
    num_classes: int | None = None


@dataclass(frozen=True)
class PipelineSpec:
    """One run's model, preprocessing, batching and placement: what ``tokenize``, ``eval`` (and the jobs built the
    same way) take, each adding only its own output options.

    Args:
        model: a model spec (checkpoint directory or ``random:vtp-small``).
        precision, rope_dtype: as ``VTPReplica``'s.
        device: ``auto`` follows the placement (``npu:0`` / ``cuda:0`` / ``cpu``); or any ``VTPReplica`` device.
        preprocessing: how each input becomes the square model input (``Preprocessing``).
        batch_size: images per model call.
        block_size: images per preprocess task and per replica call, which splits it into model batches of
            ``batch_size``: Ray Data's cost is per block, not per image. Default (None): about
            ``BLOCK_BYTES`` of pixels, a whole number of model batches, and at least four blocks per preprocess slot.
        replicas: actors in the model pool; ``(min, max)`` for an autoscaling pool. Default: one per NPU / GPU
            of the cluster for accelerator placements, else 1.
        resources: per replica: ``auto`` (NPU, else GPU, else CPU, from the cluster), ``npu`` / ``gpu`` / ``cpu``,
            Ray resources such as ``{"NPU": 1}``, or Ray actor options.
        preprocess_cpus: Ray CPUs per read + preprocess task. Fractional by default: preprocessing is light and
            waits on storage. It must differ from the replicas' CPUs, or Ray Data fuses preprocessing into the model
            actors (ray-project/ray#54433), where it would run in series with inference.
        labels_from_dirs: label = first-level sub-directory of directory and glob inputs (ImageFolder).
        address: the Ray cluster to join (``auto``: the local ``ray start`` one); default an embedded local Ray,
            or the one this process is already connected to.
        cpu_threads: torch threads of a CPU replica: a number, ``auto`` (the default: of the node's cores, the
            fewest within 25% of the fastest warm-up call, ``vtp_ray.cpu_threads``), or None (the node's cores).
        filesystem: the pyarrow filesystem the input paths live in (default: from each path or URI).
        progress: show Ray Data's progress bars.
        dashboard: start Ray's dashboard with an embedded local Ray. Off by default: it adds 1-2 s to ``ray.init``
            on a small machine (the cluster's own dashboard serves jobs that join one).
        samples: how samples in webdataset shards and parquet files with image bytes are read (``sources``).
        serve: run the model work on this running Serve app's model replicas, at batch priority, instead of
            replicas of the job's own (``served``).
        compile, compile_cache: as ``VTPReplica``'s (``off``, ``on``, ``auto``); on a Serve app, what the app must
            serve. Until a shape's graph is compiled (in the background) its batches run eagerly.
        cuda_graphs: as ``VTPReplica``'s: on CUDA, batches of up to ``batch_size`` replay recorded CUDA graphs (a
            job on a Serve app runs as the app's replicas do).
        preprocess_concurrency: read + preprocess tasks at once at most (default: as many as the CPUs allow; with
            ``serve``, a quarter of the cluster's CPUs, so that the job leaves the app's ingress room).
        cpu_priority: the OS priority of the job's own work (preprocessing, its model stage, Ray Data's executor
            on the driver; ``priority``): ``low`` (niceness 19), ``idle`` (``SCHED_IDLE``: only what the app leaves),
            ``normal`` (as Ray runs them). Default (None): ``low`` with ``serve``, so that the app's own processes
            get the cores first, else ``normal``.
    """

    model: str
    precision: str = "fp32"
    device: str = "auto"
    rope_dtype: str = "float32"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    batch_size: int = 32
    replicas: int | tuple[int, int] | None = None
    resources: str | Mapping[str, Any] = "auto"
    preprocess_cpus: float = 0.5
    labels_from_dirs: bool = False
    address: str | None = None
    cpu_threads: CpuThreads = "auto"
    filesystem: pafs.FileSystem | None = None
    progress: bool = True
    dashboard: bool = False
    samples: SampleOptions = field(default_factory=SampleOptions)
    block_size: int | None = None
    serve: ServeTarget | None = None
    preprocess_concurrency: int | None = None
    compile: str = "auto"
    compile_cache: str | None = None
    cuda_graphs: bool = True
    cpu_priority: CpuPriority | None = None

    def __post_init__(self) -> None:
        replicas = self.replicas
        if not isinstance(self.preprocessing, Preprocessing):
            raise TypeError(f"preprocessing must be a Preprocessing, got {type(self.preprocessing).__name__}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_precision(self.precision)
        if self.rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"rope_dtype must be one of {list(ROPE_DTYPES)}, got {self.rope_dtype!r}")
        if replicas is not None and not (
            (isinstance(replicas, int) and replicas >= 1)
            or (isinstance(replicas, tuple) and len(replicas) == 2 and 1 <= replicas[0] <= replicas[1])
        ):
            raise ValueError(f"replicas must be a positive int or a (min, max) range, got {replicas!r}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        check_cpu_threads(self.cpu_threads)
        if self.preprocess_cpus <= 0:
            raise ValueError(f"preprocess_cpus must be > 0, got {self.preprocess_cpus}")
        check_compile_mode(self.compile)
        if self.preprocess_concurrency is not None and self.preprocess_concurrency < 1:
            raise ValueError(f"preprocess_concurrency must be >= 1, got {self.preprocess_concurrency}")
        if self.cpu_priority is not None and self.cpu_priority not in CPU_PRIORITIES:
            raise ValueError(f"cpu_priority must be one of {list(CPU_PRIORITIES)}, got {self.cpu_priority!r}")

    @property
    def job_cpu_priority(self) -> CpuPriority:
        """The CPU priority of the job's own work: ``cpu_priority``, else ``low`` on a Serve app, else ``normal``."""
        return self.cpu_priority or ("low" if self.serve is not None else "normal")

    def preprocess_bound(self, cpus: float) -> int | None:
        """Read + preprocess tasks at once at most on a cluster of ``cpus`` CPUs: ``preprocess_concurrency``, else
        on a running app's cluster a quarter of its CPUs, else None (as many as their CPUs allow)."""
        if self.preprocess_concurrency is None and self.serve is not None:
            return max(1, int(cpus // 4))
        return self.preprocess_concurrency

    def preprocess_slots(self, cpus: float) -> int:
        """Read + preprocess tasks that run at once on a cluster of ``cpus`` CPUs: as many as their CPUs allow,
        within ``preprocess_bound``."""
        slots = max(1, int(cpus / self.preprocess_cpus))
        bound = self.preprocess_bound(cpus)
        return min(slots, bound) if bound else slots

    def preprocess_tasks(self, cpus: float, fn_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Ray Data's options for the read + preprocess tasks on a cluster of ``cpus`` CPUs: their CPUs each, how
        many run at once (``preprocess_bound``), and with ``fn_kwargs`` the function's keyword arguments plus
        ``priority`` (the job's CPU priority: wrap the function in ``priority.job_priority``)."""
        concurrency = self.preprocess_bound(cpus)
        options: dict[str, Any] = {"num_cpus": self.preprocess_cpus, **(task_pool(concurrency) if concurrency else {})}
        if fn_kwargs is not None:
            options["fn_kwargs"] = {**fn_kwargs, "priority": self.job_cpu_priority}
        return options


def task_pool(size: int) -> dict[str, Any]:
    """Ray Data's ``map_batches`` options for at most ``size`` tasks at once: a ``TaskPoolStrategy`` where Ray
    exports one (``concurrency``, which Ray deprecated in 2.51, before that)."""
    import ray.data

    strategy = getattr(ray.data, "TaskPoolStrategy", None)
    return {"compute": strategy(size=size)} if strategy is not None else {"concurrency": size}


@dataclass(frozen=True)
class ModelFacts:
    """What outputs record about a model spec, read from its config alone (no weights are loaded)."""

    name: str
    spec: str
    random_weights: bool
    config_digest: str
    patch_size: int
    latent_channels: int
    embedding_dim: int | None

    @classmethod
    def of(cls, model: str, size: int | None = None) -> ModelFacts:
        """Read ``model``'s config; with ``size``, also check that it is a multiple of the model's patch size."""
        from ..model.source import read_spec

        resolved = read_spec(model)
        config = resolved.config
        if size is not None and size % config.vision_patch_size:
            raise ValueError(f"size {size} is not a multiple of the model's patch size {config.vision_patch_size}")
        return cls(
            name=resolved.name,
            spec=resolved.spec,
            random_weights=resolved.random_weights,
            config_digest=config.digest(),
            patch_size=config.vision_patch_size,
            latent_channels=config.latent_channels,
            embedding_dim=config.embedding_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def identity(self, spec: PipelineSpec) -> dict[str, Any]:
        """The identity (``ReplicaInfo.identity``) of the replicas ``spec`` runs this model on."""
        return model_identity(self.config_digest, self.random_weights, spec.precision, spec.rope_dtype, spec.compile)
