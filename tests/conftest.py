"""Shared fixtures: the tiny checkpoint and its upstream reference, and one local Ray runtime for the modules that
can share it (Serve and Ray Data jobs on a single node). Modules that need a runtime of their own (a multi-node
``Cluster``, a dashboard for ``serve deploy``, a ``serve run`` subprocess) start it themselves; this one is stopped
for them first, through the ``own_ray`` fixture."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from helpers import TINY
from safetensors.torch import load_file

# Job caches (the zero-shot classifiers) in a directory of this test session, never the user's.
os.environ.setdefault("VTP_CACHE_DIR", tempfile.mkdtemp(prefix="vtp-ray-test-cache-"))

if TYPE_CHECKING:
    import serving


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs value (the fixtures' tolerance measure)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return Path(TINY)


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(Path(TINY) / "reference.safetensors"))


@pytest.fixture(scope="module")
def ray_runtime() -> str:
    """The shared local Ray: 4 logical CPUs and 2 declared NPUs (so NPU pinning is testable here; the replicas
    compute on the CPU). Started by the first module that asks, left running for the next one, stopped at the end
    of the session (or by ``own_ray``). Returns its GCS address, for drivers in other processes."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh runtime, never a cluster some `ray start` left on this machine
        ray.init(
            address="local", num_cpus=4, resources={"NPU": 2}, include_dashboard=False, logging_level=logging.WARNING
        )
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def own_ray() -> None:
    """For modules that start a Ray of their own (mark them ``own_ray``): the shared runtime is stopped first."""
    _stop_ray()


@pytest.fixture(scope="module")
def serve_instance(ray_runtime: str) -> serving.ServeInstance:
    """The shared Serve (``serving.shared_serve``) on the shared Ray."""
    from serving import shared_serve  # here: importing Ray Serve costs the fast tests seconds

    return shared_serve()


@pytest.fixture(scope="module", autouse=True)
def _no_serve_app_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each module, its Serve applications are deleted (Serve and the shared Ray stay), also when a fixture
    failed half-way: the next module's apps must not find a route prefix taken or CPUs held. A module with a Ray of
    its own leaves them: its Ray is stopped whole after it."""
    yield
    import sys

    if request.node.get_closest_marker("own_ray") is not None:
        return

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            from serving import delete_apps

            delete_apps()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Modules with a Ray of their own run last, so that the shared runtime starts once for all the others.
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


def pytest_sessionfinish() -> None:
    _stop_ray()


def _stop_ray() -> None:
    import sys

    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        # Not serve.shutdown(): it stops every replica gracefully (over a minute and a half after a push that left
        # a replica pending), while stopping the local Ray kills them all at once. Only the driver's cached Serve
        # client is dropped, so that the next Ray starts a Serve of its own.
        from ray.serve.context import _set_global_client

        ray.shutdown()
        _set_global_client(None)
