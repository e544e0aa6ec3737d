"""``cpu_threads="auto"``: a CPU replica keeps the fewest torch threads that are about as fast as all of them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vtp_ray.cpu_threads import TUNE_BATCH, TUNE_BELOW_S, WITHIN, candidates, fewest_threads, node_cores, tune
from vtp_ray.pipeline.worker import replica_cpu_threads
from vtp_ray.replica import VTPReplica


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch at two threads in this thread (the count a 2-CPU replica starts from), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_candidates_halve_down_to_one() -> None:
    assert candidates(8) == [8, 4, 2, 1]
    assert candidates(6) == [6, 3, 1]
    assert candidates(2) == [2, 1]
    assert candidates(1) == [1]


def test_the_fewest_threads_within_the_margin_of_the_fastest_are_kept() -> None:
    assert fewest_threads({4: 1.0, 2: 1.0 + WITHIN / 2, 1: 2.0}) == 2
    assert fewest_threads({2: 1.0, 1: 1.0 + WITHIN * 1.5}) == 2
    assert fewest_threads({2: 1.0, 1: 0.8}) == 1  # one thread faster outright (small ops, barriers)
    assert fewest_threads({2: 1.0, 1: 1.0 + WITHIN / 2}) == 1


class Workload:
    """A call whose time depends on the thread count set, as a model call's does: ``seconds[threads]`` per image
    (set at the most threads to start with, as a replica warmed up at its count is)."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds, self.threads, self.batches = seconds, max(seconds), []

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def call(self, batch: int) -> None:
        self.batches.append((self.threads, batch))
        time.sleep(self.seconds[self.threads] * (1 if batch == 1 else batch / TUNE_BATCH))


def test_tune_keeps_the_fewest_threads_that_are_about_as_fast() -> None:
    work = Workload({4: 0.020, 2: 0.021, 1: 0.045})
    timings = tune(work.call, work.set_threads, 4)
    assert list(timings) == [4, 2, 1]
    assert work.threads == 2  # two threads are within the margin of four; one (2.25x) is not
    assert all(batch == TUNE_BATCH for threads, batch in work.batches if threads != 4)


def test_tune_stops_halving_at_the_first_count_out_of_the_margin() -> None:
    work = Workload({8: 0.004, 4: 0.0045, 2: 0.008, 1: 0.016})  # large ops: halving the threads doubles the time
    timings = tune(work.call, work.set_threads, 8)
    assert list(timings) == [8, 4, 2] and work.threads == 4
    assert 1 not in {threads for threads, _ in work.batches}
    # where fewer threads keep getting faster (small ops), every count is tried
    work = Workload({8: 0.006, 4: 0.004, 2: 0.003, 1: 0.003})
    assert list(tune(work.call, work.set_threads, 8)) == [8, 4, 2, 1] and work.threads == 1


def test_tune_keeps_every_thread_without_trying_fewer_where_one_image_is_slow() -> None:
    work = Workload({2: TUNE_BELOW_S * 1.2, 1: 0.001})
    assert tune(work.call, work.set_threads, 2, repeats=1) == {}
    assert work.threads == 2 and {threads for threads, _ in work.batches} == {2}
    # twice the bound or more: one call decides
    work = Workload({2: TUNE_BELOW_S * 2.2, 1: 0.001})
    assert tune(work.call, work.set_threads, 2) == {}
    assert work.batches == [(2, 1)]


def test_a_replica_with_auto_threads_runs_at_the_count_it_measured(tiny_dir: Path, two_threads: None) -> None:
    replica = VTPReplica(str(tiny_dir), device="cpu", warmup_size=32, cpu_threads="auto")
    timings = replica.cpu_thread_timings
    assert set(timings) == {2, 1}, "a one-image call of the tiny model is far under TUNE_BELOW_S"
    assert replica.cpu_threads == fewest_threads(timings) == torch.get_num_threads()
    # the results do not depend on the count (float sums in another order: a tolerance, not bits)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    chosen = replica.encode(images).latents
    torch.set_num_threads(2)
    np.testing.assert_allclose(replica.encode(images).latents, chosen, rtol=1e-4, atol=1e-5)


def test_an_explicit_thread_count_is_kept_as_given(tiny_dir: Path, two_threads: None) -> None:
    replica = VTPReplica(str(tiny_dir), device="cpu", warmup_size=32, cpu_threads=1)
    assert (replica.cpu_threads, replica.cpu_thread_timings) == (1, {})


def test_a_jobs_cpu_replica_starts_from_the_nodes_cores(two_threads: None) -> None:
    # Inside a Ray actor torch follows num_cpus (1 by default): a job's replica starts from the node's cores instead
    torch.set_num_threads(1)
    assert replica_cpu_threads("auto", "cpu") == "auto" and torch.get_num_threads() == node_cores()
    torch.set_num_threads(1)
    assert replica_cpu_threads(None, "cpu") == node_cores() == torch.get_num_threads()
    assert replica_cpu_threads(3, "cpu") == 3
    # an accelerator replica's host threads are left as they are
    torch.set_num_threads(1)
    assert replica_cpu_threads("auto", "npu:0") == "auto" and torch.get_num_threads() == 1
