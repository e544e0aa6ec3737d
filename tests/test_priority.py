"""``vtp_ray.pipeline.priority``: a job's work at the OS's idle priority, in a thread of its own (Linux keeps the
scheduling policy per thread), while the calling thread keeps its own."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from vtp_ray.pipeline.priority import LOW_NICENESS, job_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")


def policy() -> int:
    return os.sched_getscheduler(threading.get_native_id())


@job_priority
def work(x: int, *, fail: bool = False) -> tuple[int, int]:
    if fail:
        raise ValueError(f"bad input {x}")
    return x * 2, policy()


@job_priority
def blocks(n: int) -> Iterator[tuple[int, int]]:
    for i in range(n):
        yield i, policy()


def test_work_runs_at_idle_priority_and_the_caller_keeps_its_own() -> None:
    mine = policy()
    assert mine != os.SCHED_IDLE
    assert work(3, priority="idle") == (6, os.SCHED_IDLE)
    assert work(4) == (8, mine)  # normal (a standalone job): the work runs where it is called
    assert policy() == mine


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_low_priority_is_the_lowest_niceness_in_its_own_thread() -> None:
    mine = niceness()
    assert work(1, priority="low") == (2, policy())  # the policy stays; the niceness goes to 19
    assert _nice_of_low_thread() == LOW_NICENESS and niceness() == mine


def _nice_of_low_thread() -> int:
    @job_priority
    def nice_here() -> int:
        return niceness()

    return nice_here(priority="low")


def test_a_generators_items_are_made_at_idle_priority_in_order_and_errors_come_through() -> None:
    mine = policy()
    assert list(blocks(3, priority="idle")) == [(0, os.SCHED_IDLE), (1, os.SCHED_IDLE), (2, os.SCHED_IDLE)]
    assert list(blocks(2, priority="normal")) == [(0, mine), (1, mine)]
    with pytest.raises(ValueError, match="bad input 5"):
        work(5, fail=True, priority="idle")
    assert policy() == mine


def test_a_job_on_an_app_runs_low_unless_told_and_the_flag_says_so() -> None:
    from vtp_ray.cli import build_parser
    from vtp_ray.cli.args import pipeline_spec
    from vtp_ray.pipeline import PipelineSpec
    from vtp_ray.pipeline.served import ServeTarget

    assert PipelineSpec("m").job_cpu_priority == "normal"
    assert PipelineSpec("m", serve=ServeTarget("vtp")).job_cpu_priority == "low"
    assert PipelineSpec("m", serve=ServeTarget("vtp"), cpu_priority="normal").job_cpu_priority == "normal"
    with pytest.raises(ValueError, match="cpu_priority must be one of"):
        PipelineSpec("m", cpu_priority="lowest")  # type: ignore[arg-type]
    argv = ["tokenize", "in", "-o", "o", "--model", "m", "--serve-app", "vtp", "--cpu-priority", "normal"]
    assert pipeline_spec(build_parser().parse_args(argv)).job_cpu_priority == "normal"


class Stage:
    """A model stage as ``worker.served_stage`` runs it: built once per process and job, then called per block."""

    built: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, *, job: str) -> None:
        Stage.built.append((job, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    def __call__(self, block: list[int]) -> tuple[list[int], int]:
        return block, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_served_stage_is_built_once_per_job_at_its_priority_and_the_last_jobs_is_dropped() -> None:
    from vtp_ray.pipeline import worker

    run = worker.served_stage(Stage)  # type: ignore[arg-type]
    assert run.__name__ == "StageOnServeApp"  # what the progress bar and the process title show
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for block in ([1], [2]):
        assert run(block, key="job-a", stage_kwargs={"job": "a"}, priority="low") == (block, LOW_NICENESS)
    assert run([3], key="job-b", stage_kwargs={"job": "b"}, priority="normal") == ([3], mine)
    assert Stage.built == [("a", LOW_NICENESS), ("b", mine)]
    assert list(worker._SERVED_STAGES) == ["job-b"]  # a process keeps one job's stage, never every job's
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
