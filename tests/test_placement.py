"""Replica placement chosen from the cluster's resources, and explicit placements checked against them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vtp_ray.placement import (
    OPENMP_WAIT_VARS,
    PlacementError,
    assigned_device,
    device_for,
    pending_actors,
    resolve_placement,
)

LAPTOP = {"CPU": 8.0, "memory": 1e10}
GPU_BOX = {"CPU": 32.0, "GPU": 4.0}
ASCEND = {"CPU": 192.0, "NPU": 8.0, "GPU": 0.0}


@pytest.mark.parametrize(
    ("cluster", "options", "device"),
    [
        (ASCEND, {"resources": {"NPU": 1}}, "npu:0"),
        ({**GPU_BOX, "NPU": 2.0}, {"resources": {"NPU": 1}}, "npu:0"),
        (GPU_BOX, {"num_gpus": 1}, "cuda:0"),
        (LAPTOP, {"num_cpus": 1}, "cpu"),
    ],
)
def test_auto_prefers_npu_then_gpu_then_cpu(cluster, options, device):
    assert resolve_placement("auto", cluster) == options
    assert resolve_placement(None, cluster) == options
    assert device_for(options) == device


def test_explicit_placements_win_when_the_cluster_can_hold_them():
    assert resolve_placement({"num_cpus": 4}, ASCEND) == {"num_cpus": 4}
    assert resolve_placement("gpu", GPU_BOX) == {"num_gpus": 1}
    assert resolve_placement({"resources": {"NPU": 2}, "num_cpus": 8}, ASCEND) == {
        "resources": {"NPU": 2},
        "num_cpus": 8,
    }


def test_an_unsatisfiable_placement_fails_at_once_naming_the_setting():
    with pytest.raises(PlacementError) as err:
        resolve_placement({"resources": {"NPU": 1}}, LAPTOP, setting="serve_config.yaml args.placement")
    message = str(err.value)
    assert "serve_config.yaml args.placement" in message and "'NPU': 1.0" in message and "auto" in message
    with pytest.raises(PlacementError, match="GPU"):
        resolve_placement("gpu", ASCEND)
    with pytest.raises(PlacementError, match="unsupported keys"):
        resolve_placement({"num_tpus": 1}, ASCEND)
    with pytest.raises(PlacementError, match="use auto, npu, gpu, cpu"):
        resolve_placement("tpu", ASCEND)


def test_a_placement_no_single_node_can_hold_fails_although_the_cluster_sums_to_it():
    two_small_nodes = [{"CPU": 4.0, "NPU": 1.0}, {"CPU": 4.0, "NPU": 1.0}]
    assert resolve_placement("auto", two_small_nodes) == {"resources": {"NPU": 1}}
    with pytest.raises(PlacementError, match=r"no node has that much \(the most any node has: \{'NPU': 1.0\}\)"):
        resolve_placement({"resources": {"NPU": 2}}, two_small_nodes, setting="--resources")
    with pytest.raises(PlacementError, match="no node has that much"):  # every resource on the same node
        resolve_placement({"resources": {"NPU": 1}, "num_cpus": 8}, [{"CPU": 8.0}, {"CPU": 2.0, "NPU": 8.0}])
    assert resolve_placement({"resources": {"NPU": 1}, "num_cpus": 2}, [{"CPU": 8.0}, {"CPU": 2.0, "NPU": 8.0}])


@pytest.mark.slow
def test_the_assigned_device_follows_the_accelerator_ray_gave(ray_runtime):
    import ray

    on_npu = ray.remote(resources={"NPU": 1})(assigned_device)
    on_cpu = ray.remote(num_cpus=0.5)(assigned_device)
    assert ray.get([on_npu.remote(), on_cpu.remote()]) == ["npu:0", "cpu"]


@pytest.mark.slow
def test_ray_says_which_pending_actors_can_never_be_placed(ray_runtime):
    """Ray's infeasible verdict, per pending actor: a resource no node has is infeasible; a placed actor still in
    its constructor (a long warm-up) and one waiting for NPUs that exist but are taken are not."""
    import time

    import ray
    from helpers import wait_until

    @ray.remote
    class Slow:
        def __init__(self, seconds: float) -> None:
            time.sleep(seconds)

    warming = Slow.options(name="probe-warming", num_cpus=0.1).remote(30)
    nowhere = Slow.options(name="probe-nowhere", num_cpus=0.1, resources={"TPU": 1}).remote(0)
    holders = [Slow.options(name=f"probe-holder-{i}", resources={"NPU": 1}, num_cpus=0.1).remote(30) for i in (0, 1)]
    busy = Slow.options(name="probe-busy", num_cpus=0.1, resources={"NPU": 2}).remote(0)
    try:

        def verdicts() -> dict[str, bool] | None:
            found = {a.name: a.infeasible for a in pending_actors("probe-")}
            return found if found.get("probe-nowhere") else None

        found = wait_until(verdicts, 20, "Ray to report the TPU actor infeasible", interval_s=0.3)
        assert found["probe-nowhere"] is True
        assert found.get("probe-warming", False) is False  # placed, constructor running: never "unplaceable"
        assert found.get("probe-busy", False) is False  # the cluster has 2 NPUs, held by the others for now
        assert {a.name: a.resources for a in pending_actors("probe-nowhere")} == {
            "probe-nowhere": {"CPU": 0.1, "TPU": 1.0}
        }
    finally:
        for actor in (warming, nowhere, busy, *holders):
            ray.kill(actor)


@pytest.mark.parametrize(
    ("device", "environ", "expected"),
    [
        ("cpu", {}, {"GOMP_SPINCOUNT": "1000"}),
        ("cpu", {"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),  # the operator's choice stays
        ("cpu", {"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "0"}),
        ("npu:0", {}, {}),  # accelerator replicas' host threads are left alone
    ],
)
def test_cpu_replicas_spin_briefly_unless_told_otherwise(device, environ, expected):
    # A fresh interpreter: OpenMP reads these when torch loads, so the function acts only before that.
    code = (
        "import json, os; from vtp_ray.placement import OPENMP_WAIT_VARS, brief_openmp_waits; "
        f"brief_openmp_waits({device!r}); import torch; torch.ones(64).sum(); "
        "print(json.dumps({v: os.environ[v] for v in OPENMP_WAIT_VARS if v in os.environ}))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **environ}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
