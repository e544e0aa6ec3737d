"""Where replicas run: Ray actor options chosen from what the cluster has, or checked when given.

``auto`` asks for one NPU per replica when the cluster advertises ``NPU`` (Ascend nodes, detected by
Ray or declared with ``ray start --resources``), else one GPU, else CPUs. An explicit placement is
never second-guessed, only checked: asking for a resource the cluster lacks fails at once with a
message naming the setting to change, instead of waiting forever for a replica that cannot start.
"""

from __future__ import annotations

from typing import Any

SHORTCUTS: dict[str, dict[str, Any]] = {
    "npu": {"resources": {"NPU": 1}},
    "gpu": {"num_gpus": 1},
    "cuda": {"num_gpus": 1},
    "cpu": {"num_cpus": 1},
}


class PlacementError(ValueError):
    """A placement that this cluster can never satisfy."""


def _cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def resolve_placement(
    placement: str | dict[str, Any] | None = "auto",
    cluster: dict[str, float] | None = None,
    setting: str = "placement",
) -> dict[str, Any]:
    """Ray actor options (``resources`` / ``num_gpus`` / ``num_cpus``) for one replica.

    ``placement`` is ``auto``, a shortcut (``npu``, ``gpu``, ``cpu``) or explicit actor options;
    ``setting`` names where it came from, for the error message.
    """
    cluster = _cluster_resources() if cluster is None else cluster
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
    return options


def device_for(options: dict[str, Any]) -> str:
    """The replica ``device`` that goes with actor options: its assigned NPU / GPU, else the CPU."""
    if (options.get("resources") or {}).get("NPU"):
        return "npu:0"  # Ray narrows ASCEND_RT_VISIBLE_DEVICES to the actor's own NPU
    if options.get("num_gpus"):
        return "cuda:0"
    return "cpu"
