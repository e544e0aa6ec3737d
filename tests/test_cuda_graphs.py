"""``vtp_ray.cuda_graphs``: which calls a replica records and replays, and what runs without a graph and why.

CUDA graphs need a GPU, which CI has not: here the recorder is the one seam, a plain call of the real (tiny) model
on the CPU standing in for a recorded graph, so the bookkeeping around it runs for real. Recording and replaying on
a GPU is checked by ``vtp-ray verify --device cuda`` (replayed against direct outputs, read after other images went
through the same graphs; ``benchmarks/accelerator_check.sh``), on an H200 in docs/results.md (A7).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vtp_ray import VTPReplica
from vtp_ray.compiled import eager_units
from vtp_ray.cuda_graphs import CudaGraphs
from vtp_ray.model import load_model
from vtp_ray.outputs import CompileStatus, GraphStatus, ReplicaInfo
from vtp_ray.pipeline.worker import ModelStage


@pytest.fixture(scope="module")
def units(tiny_dir):
    return eager_units(load_model(str(tiny_dir)).model)


class Recorder:
    """Records nothing: replays call the unit directly, and every recording is kept."""

    def __init__(self, fail_on: set[tuple[str, int]] | None = None) -> None:
        self.recorded: list[tuple[str, tuple[int, ...]]] = []
        self.fail_on = fail_on or set()

    def __call__(self, unit, example: torch.Tensor, pool):
        name = "encoder" if example.shape[1] == 3 else "decoder"
        if (name, len(example)) in self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.recorded.append((name, tuple(example.shape)))
        return lambda x: unit(x)


def images(n: int, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n))


@torch.inference_mode()
def test_each_shape_is_recorded_once_and_replayed_with_the_direct_outputs(units):
    recorder = Recorder()
    graphs = CudaGraphs(units, torch.device("cpu"), max_batch=4, recorder=recorder)
    for _ in range(3):
        latents, clip = graphs.encoder(images(2))
        decoded = graphs.decoder(latents)
    graphs.encoder(images(1))
    assert recorder.recorded == [
        ("encoder", (2, 3, 32, 32)),
        ("decoder", tuple(latents.shape)),
        ("encoder", (1, 3, 32, 32)),
    ]
    direct_latents, direct_clip = units["encoder"](images(2))
    torch.testing.assert_close(latents, direct_latents)
    torch.testing.assert_close(clip, direct_clip)
    torch.testing.assert_close(decoded, units["decoder"](direct_latents))
    status = graphs.status("on (CUDA)")
    assert status.enabled and status.replays == 7 and status.direct_calls == {}
    assert status.graphs == ("decoder 2x8x2x2", "encoder 1x3x32x32", "encoder 2x3x32x32")


@torch.inference_mode()
def test_large_batches_shapes_not_settled_yet_and_shapes_past_the_cap_run_directly(units):
    recorder = Recorder()
    settled: dict[int, str | None] = {1: None, 2: "eager"}  # by batch: a compiled replica's shape state
    graphs = CudaGraphs(
        units, torch.device("cpu"), max_batch=2, max_graphs=2, settled=lambda unit, x: settled[len(x)],
        recorder=recorder,
    )  # fmt: skip
    graphs.encoder(images(3))  # larger than max_batch
    graphs.encoder(images(1))  # its compiled graph is not ready yet: not recorded
    assert recorder.recorded == []
    settled[1] = "compiled"
    graphs.encoder(images(1))
    graphs.encoder(images(1))
    graphs.encoder(images(2))  # its compile failed: recorded as the eager call it stays
    graphs.encoder(images(2, side=48))  # a third shape: past max_graphs
    assert [shape for _, shape in recorder.recorded] == [(1, 3, 32, 32), (2, 3, 32, 32)]
    status = graphs.status("on (CUDA)")
    assert status.direct_calls == {"large_batch": 1, "not_settled": 1, "over_cap": 1}
    assert status.replays == 3 and status.compiled_replays == 2


@torch.inference_mode()
def test_a_shape_that_cannot_be_recorded_runs_directly_for_good_and_says_why(units, caplog):
    recorder = Recorder(fail_on={("encoder", 2)})
    graphs = CudaGraphs(units, torch.device("cpu"), max_batch=4, recorder=recorder)
    for _ in range(3):
        latents, _ = graphs.encoder(images(2))  # still answered, by the direct call
    torch.testing.assert_close(latents, units["encoder"](images(2))[0])
    graphs.encoder(images(1))  # other shapes are still recorded
    status = graphs.status("on (CUDA)")
    assert status.failed == {"encoder 2x3x32x32": "RuntimeError: operation not permitted when stream is capturing"}
    assert status.direct_calls == {"failed": 3} and status.replays == 1
    assert [r.getMessage() for r in caplog.records].count(
        "no CUDA graph for encoder 2x3x32x32: RuntimeError: operation not permitted when stream is capturing; such "
        "calls run without one"
    ) == 1


def test_a_replica_off_cuda_says_why_it_records_no_graphs(tiny_dir):
    replica = VTPReplica(str(tiny_dir), "cpu", warmup_size=0)
    status = replica.info.cuda_graphs
    assert not status.enabled and status.reason == "not on CUDA (cpu)"
    assert VTPReplica(str(tiny_dir), "cpu", warmup_size=0, cuda_graphs=False).graph_status().reason == (
        "cuda_graphs=False"
    )
    replica.encode(np.zeros((1, 32, 32, 3), np.uint8))
    info = ReplicaInfo.from_dict(replica.info.to_dict())  # as /v1/model and a job's report carry it
    assert info.cuda_graphs == status


def test_bad_bounds_are_refused(units):
    with pytest.raises(ValueError, match="max_batch and max_graphs must be >= 1"):
        CudaGraphs(units, torch.device("cpu"), max_batch=0)


def test_a_jobs_rows_count_replays_as_what_their_graphs_recorded():
    # ModelStage marks a batch's rows compiled when its calls ran compiled and none eagerly; a replay runs no Python
    # of the compiled call, so the replica's CUDA graphs count them instead.
    compile = CompileStatus(mode="on", compiled=True, backend="inductor", reason="on", ready=True, compiled_calls=3)
    graphs = GraphStatus(enabled=True, reason="on (CUDA)", replays=10, compiled_replays=8)
    stage = SimpleNamespace(replica=SimpleNamespace(info=SimpleNamespace(compile=compile, cuda_graphs=graphs)))
    assert ModelStage._compiled_and_eager_calls(stage) == (11, 2)
    stage.replica.info.cuda_graphs = None  # off CUDA
    assert ModelStage._compiled_and_eager_calls(stage) == (3, 0)
