"""Where a linear probe's Ray Train workers run: one per accelerator (or CPU workers), each one's resources, and
the process group backend (HCCL on NPUs, NCCL on GPUs, gloo on CPUs); checked against the cluster before anything
starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..placement import PlacementError, resolve_placement

__all__ = ["ACCELERATOR_WORKER_CPUS", "CPU_WORKER_CPUS", "WorkerPlacement", "worker_placement"]

#: Ray CPUs of a CPU worker: a fraction, so that the read and augmentation tasks always find CPUs (workers that
#: take whole CPUs leave Ray Data none on a small machine, and the run waits forever).
CPU_WORKER_CPUS = 0.5
#: Ray CPUs beside an accelerator worker's accelerator (its Python thread feeding the device).
ACCELERATOR_WORKER_CPUS = 1.0


@dataclass(frozen=True)
class WorkerPlacement:
    """The Ray Train workers: how many, what each reserves, the process group backend, the device kind."""

    workers: int
    resources: dict[str, float]
    use_gpu: bool
    backend: str
    device_kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "resources_per_worker": self.resources, "use_gpu": self.use_gpu,
                "backend": self.backend, "device_kind": self.device_kind}  # fmt: skip


def worker_placement(
    resources: str | Mapping[str, Any],
    replicas: int | None,
    nodes: Sequence[Mapping[str, float]],
    preprocess_cpus: float,
) -> WorkerPlacement:
    """One worker per accelerator. ``auto``: NPUs (``{"NPU": 1}``, HCCL) if the cluster has them, else GPUs (NCCL),
    else CPU workers (gloo) that ask for a fraction of a CPU; ``npu``, ``gpu``, ``cpu``, or Ray resources per worker
    such as ``{"NPU": 1, "CPU": 4}``. Fails at once when the workers could never start, or would leave no CPU for
    reading the images.

    Ray Train chooses NCCL for ``use_gpu`` and gloo otherwise; a custom resource such as ``NPU`` needs its backend
    named (``TorchConfig(backend="hccl")``; Ray registers torch_npu's HCCL then).
    """
    cluster: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            cluster[name] = cluster.get(name, 0) + amount
    if isinstance(resources, str):
        kind = resources.lower()
        if kind == "auto":
            kind = "npu" if cluster.get("NPU", 0) >= 1 else "gpu" if cluster.get("GPU", 0) >= 1 else "cpu"
        shortcuts = {
            "npu": {"NPU": 1.0, "CPU": ACCELERATOR_WORKER_CPUS},
            "gpu": {"GPU": 1.0, "CPU": ACCELERATOR_WORKER_CPUS},
            "cuda": {"GPU": 1.0, "CPU": ACCELERATOR_WORKER_CPUS},
            "cpu": {"CPU": CPU_WORKER_CPUS},
        }
        if kind not in shortcuts:
            raise PlacementError(f"--resources={resources!r}: use auto, npu, gpu, cpu or Ray resources per worker")
        wanted = shortcuts[kind]
    else:
        wanted = {str(k): float(v) for k, v in resources.items()}
        wanted.setdefault("CPU", CPU_WORKER_CPUS if not {"NPU", "GPU"} & set(wanted) else ACCELERATOR_WORKER_CPUS)
    if wanted.get("NPU"):
        device_kind, backend, accelerator = "npu", "hccl", "NPU"
    elif wanted.get("GPU"):
        device_kind, backend, accelerator = "cuda", "nccl", "GPU"
    else:
        device_kind, backend, accelerator = "cpu", "gloo", None
    # The same checks as a replica's: a worker that fits on no node could never start.
    options: dict[str, Any] = {"num_cpus": wanted["CPU"]}
    custom = {k: v for k, v in wanted.items() if k not in ("CPU", "GPU")}
    if custom:
        options["resources"] = custom
    if wanted.get("GPU"):
        options["num_gpus"] = wanted["GPU"]
    resolve_placement(options, nodes, setting="--resources")
    if replicas is None:
        replicas = max(1, int(cluster.get(accelerator, 0) // wanted[accelerator])) if accelerator else 1
    short = {k: v * replicas for k, v in wanted.items() if v * replicas > cluster.get(k, 0)}
    if short:
        raise PlacementError(f"{replicas} workers with {wanted} need {short}; the cluster has "
                             f"{ {k: cluster.get(k, 0) for k in short} }: lower --replicas")  # fmt: skip
    if replicas * wanted["CPU"] + preprocess_cpus > cluster.get("CPU", 0):
        raise PlacementError(
            f"{replicas} workers with {wanted['CPU']:g} CPU each leave no CPU for reading the images "
            f"({preprocess_cpus:g} per task) in a cluster of {cluster.get('CPU', 0):g} CPUs: the run would wait "
            "forever. Ask for less per worker (--resources '{\"CPU\": 0.5}'), fewer workers, or more logical CPUs "
            "(ray start --num-cpus N)"
        )
    return WorkerPlacement(replicas, wanted, bool(wanted.get("GPU")), backend, device_kind)
