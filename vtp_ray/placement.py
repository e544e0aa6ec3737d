"""Where replicas run: Ray actor options chosen from what the cluster has, or checked when given.

``auto`` asks for one NPU per replica when the cluster advertises ``NPU`` (Ascend nodes, detected by
Ray or declared with ``ray start --resources``), else one GPU, else CPUs. An explicit placement is
never second-guessed, only checked: asking for a resource the cluster lacks fails at once with a
message naming the setting to change, instead of waiting forever for a replica that cannot start.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SHORTCUTS: dict[str, dict[str, Any]] = {
    "npu": {"resources": {"NPU": 1}},
    "gpu": {"num_gpus": 1},
    "cuda": {"num_gpus": 1},
    "cpu": {"num_cpus": 1},
}


class PlacementError(ValueError):
    """A placement that this cluster can never satisfy."""


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def resolve_placement(
    placement: str | dict[str, Any] | None = "auto",
    nodes: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
    setting: str = "placement",
) -> dict[str, Any]:
    """Ray actor options (``resources`` / ``num_gpus`` / ``num_cpus``) for one replica.

    ``placement`` is ``auto``, a shortcut (``npu``, ``gpu``, ``cpu``) or explicit actor options; ``nodes`` the
    resources of each node (one mapping: a one-node cluster; default: the connected cluster's); ``setting``
    names where the placement came from, for the error message.
    """
    nodes = cluster_nodes() if nodes is None else [nodes] if isinstance(nodes, Mapping) else list(nodes)
    cluster: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            cluster[name] = cluster.get(name, 0) + amount
    if placement is None or placement == "auto":
        if cluster.get("NPU", 0) >= 1:
            return {"resources": {"NPU": 1}}
        if cluster.get("GPU", 0) >= 1:
            return {"num_gpus": 1}
        return {"num_cpus": 1}
    if isinstance(placement, str):
        try:
            options = dict(SHORTCUTS[placement.lower()])
        except KeyError:
            raise PlacementError(f"{setting}={placement!r}: use auto, npu, gpu, cpu or Ray actor options") from None
    else:
        options = dict(placement)
    unknown = set(options) - {"resources", "num_gpus", "num_cpus", "memory", "accelerator_type"}
    if unknown:
        raise PlacementError(f"{setting} has unsupported keys {sorted(unknown)}")
    wanted = {str(k): float(v) for k, v in (options.get("resources") or {}).items()}
    if options.get("num_gpus"):
        wanted["GPU"] = float(options["num_gpus"])
    if options.get("num_cpus"):
        wanted["CPU"] = float(options["num_cpus"])
    short = {k: v for k, v in wanted.items() if cluster.get(k, 0) < v}
    if short:
        have = {k: cluster.get(k, 0) for k in short}
        raise PlacementError(
            f"{setting} asks for {short} per replica but the whole cluster has {have}, so no replica could ever "
            f"start. Change {setting} (e.g. to 'auto', which picks NPU, else GPU, else CPU from the cluster), or "
            "add nodes that have it (on Ascend: `ray start --resources '{\"NPU\": 8}'` if Ray did not detect the NPUs)."
        )
    if not any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        largest = {k: max(node.get(k, 0) for node in nodes) for k in wanted}
        raise PlacementError(
            f"{setting} asks for {wanted} per replica, but a replica runs on one node and no node has that much "
            f"(the most any node has: {largest}). Ask for less per replica in {setting}."
        )
    return options


def device_for(options: dict[str, Any]) -> str:
    """The replica ``device`` that goes with actor options: its assigned NPU / GPU, else the CPU."""
    if (options.get("resources") or {}).get("NPU"):
        return "npu:0"  # Ray narrows ASCEND_RT_VISIBLE_DEVICES to the actor's own NPU
    if options.get("num_gpus"):
        return "cuda:0"
    return "cpu"


def assigned_device() -> str:
    """Inside a Ray actor or task: the device of the accelerator Ray assigned to it, ``npu:0`` / ``cuda:0`` (Ray
    narrows the visible devices to the assigned ones, so index 0 is its own), or ``cpu`` when it assigned none."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids()
    if ids.get("NPU"):
        return "npu:0"
    if ids.get("GPU"):
        return "cuda:0"
    return "cpu"


#: What a CPU replica sets where the environment leaves OpenMP's waiting alone (see ``brief_openmp_waits``).
OPENMP_WAITS = {"GOMP_SPINCOUNT": "1000"}
#: The variables that say how OpenMP's idle threads wait (GNU OpenMP's, which torch's Linux wheels use).
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def brief_openmp_waits(device: str) -> None:
    """In a CPU replica's process, before torch loads: torch's threads spin briefly at OpenMP barriers, then sleep
    (``GOMP_SPINCOUNT=1000``), unless the environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.

    A CPU replica's threads share the node's cores with the decode tasks, the Serve ingress and proxy. With OpenMP's
    default (300,000 spins) a thread spins on while its partner is preempted: VTP-Small at batch 1 took 560-610 ms
    instead of 165-175 ms with another process busy on one of the two cores. Sleeping at once
    (``OMP_WAIT_POLICY=PASSIVE``) survives that (310-330 ms) but costs every barrier a wake-up: 200-215 ms on idle
    cores. A brief spin keeps both: 170-190 ms idle, 355 ms beside the busy process, and batch 8 as fast as either.
    Too late once torch is imported in the process (OpenMP reads it at load): then nothing changes.
    """
    if device.startswith("cpu") and "torch" not in sys.modules and not any(v in os.environ for v in OPENMP_WAIT_VARS):
        os.environ.update(OPENMP_WAITS)


@dataclass(frozen=True)
class PendingActor:
    """An actor Ray has not placed yet: what it asks for, and whether Ray reports that request infeasible."""

    name: str
    resources: dict[str, float]
    infeasible: bool  # no node of the cluster has these resources (an autoscaler may still add one)


def pending_actors(name_prefix: str) -> list[PendingActor]:
    """The actors whose name starts with ``name_prefix`` that wait to be placed (``PENDING_CREATION``).

    ``infeasible`` is Ray's own verdict, the one ``ray status`` and the autoscaler read from the GCS's resource
    demands: a request no node's total resources can hold. A placed actor still running its constructor (a long
    warm-up) is not pending. These are Ray's internal GCS tables (what Serve's controller reads itself): on a Ray
    whose tables differ this returns ``[]`` and logs why once, and nothing else changes.
    """
    try:
        from ray._private.state import state
        from ray._private.worker import global_worker
        from ray.core.generated import gcs_pb2

        actors = [
            gcs_pb2.ActorTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_actor_table(None, "PENDING_CREATION")
        ]
        pending = [a for a in actors if a.name.startswith(name_prefix)]
        if not pending:
            return []
        usage = global_worker.gcs_client.get_all_resource_usage(timeout=5)
        demands = usage.resource_usage_data.resource_load_by_shape.resource_demands
        infeasible = [dict(d.shape) for d in demands if d.num_infeasible_requests_queued > 0]
    except Exception as e:  # an internal API that moved: report nothing rather than fail readiness
        _warn_once(f"cannot read Ray's pending actors ({type(e).__name__}: {e}); unplaceable replicas go unreported")
        return []
    return [
        PendingActor(a.name, dict(a.required_resources), _same_request(dict(a.required_resources), infeasible))
        for a in pending
    ]


def _same_request(resources: Mapping[str, float], shapes: Sequence[Mapping[str, float]]) -> bool:
    wanted = {k: v for k, v in resources.items() if v}
    return any({k: v for k, v in shape.items() if v} == wanted for shape in shapes)


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)
