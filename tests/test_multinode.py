"""A real multi-node Ray cluster on this one machine: a head and two worker raylets, each worker advertising
``{"NPU": 1}`` (the replicas compute on the CPU). Serve spreads its replicas over the nodes and survives one
killed under load; ``tokenize`` uses actors on both nodes and writes what one replica computes; a worker node
that dies mid-job loses nothing.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from helpers import (
    SIZE,
    TINY,
    UNLIMITED,
    free_port,
    png_bytes,
    post_concurrently,
    random_image,
    replicas_seen,
    start_tokenize_cli,
    wait_for_parts,
    wait_until,
)
from PIL import Image
from ray import serve
from ray.cluster_utils import Cluster

from deployments import AppSettings, compose_app
from vtp_ray import VTPReplica
from vtp_ray.images import preprocess
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.tokenize import tokenize_dataset
from vtp_ray.placement import PlacementError

# The soak tier: a three-raylet cluster costs CI's budget more than its tests (tests/test_cluster_scripts.py places a
# replica on a second node in CI).
pytestmark = [pytest.mark.slow, pytest.mark.own_ray, pytest.mark.soak]

NPU = {"NPU": 1}
CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(own_ray: None) -> Iterator[tuple[Cluster, list[str]]]:
    """The cluster, connected, and its two worker nodes' ids (the head has no NPU: no replica lands there)."""
    # A dead node is noticed after 2 missed health checks of 1 s (Ray's defaults: 5 of 3 s).
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    head = {"num_cpus": 2, "include_dashboard": False, "_system_config": system}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=2, resources=NPU) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        yield cluster, [node.node_id for node in workers]
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 PNGs of assorted heights and one broken file: enough batches that both replicas get work."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(40):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 64, 3), dtype=np.uint8)).save(root / f"d{i % 2}" / f"{i}.png")
    (root / "d1" / "broken.png").write_bytes(b"not a png")
    return root


def _nodes_of(replica_labels: dict[str, int]) -> set[str]:
    """Node-id prefixes out of the run stats' replica labels ("host:pid node 1a2b3c4d cpu NPU 0")."""
    return {label.split(" node ")[1].split()[0] for label in replica_labels}


@pytest.fixture(scope="class")
def serve_url(cluster) -> Iterator[str]:
    """The app with 2 replicas of {"NPU": 1}; shut down after the Serve tests, freeing the NPUs for tokenize."""
    port = free_port()
    # One proxy: every raylet here shares the loopback address, so per-node proxies would fight over the port.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        args = AppSettings(
            model=TINY, image_size=SIZE, placement={"resources": NPU}, device="cpu", rate_limits=UNLIMITED
        )
        # health_check_period_s: notice a killed replica within a second rather than ten.
        serve.run(compose_app(args, num_replicas=2, health_check_period_s=1), name="vtp", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@dataclass(frozen=True)
class _Result:
    sent: float
    status: int
    error: str | None


def _load(base_url: str, png: bytes, results: list[_Result], stop: threading.Event) -> None:
    """One client sending /v1/embed back to back until ``stop``."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            response = client.post("/v1/embed", content=png, headers={"content-type": "image/png"})
            results.append(_Result(sent, response.status_code, response.json().get("error")))


class TestServe:
    def test_the_two_replicas_land_on_different_nodes_and_both_answer(self, cluster, serve_url: str) -> None:
        _, worker_ids = cluster
        with httpx.Client(base_url=serve_url, timeout=60) as client:
            replicas = replicas_seen(client, 2)
        assert sorted(r["node_id"] for r in replicas.values()) == sorted(worker_ids)
        assert all(r["accelerator_ids"] == {"NPU": ["0"]} for r in replicas.values())

        request = {"url": "/v1/embed", "content": png_bytes(random_image()), "headers": {"content-type": "image/png"}}
        responses = post_concurrently(serve_url, [request] * 12)
        assert [r.status_code for r in responses] == [200] * 12
        # With no batch wait (the default), requests that arrive during a model call still share the next one.
        sizes = [int(r.headers["x-vtp-batch-size"]) for r in responses]
        assert max(sizes) > 1, sizes
        embeddings = np.array([r.json()["embedding"] for r in responses])
        np.testing.assert_allclose(embeddings, embeddings[:1].repeat(12, 0), atol=1e-6)  # same model on both

    def test_a_replica_killed_under_load_fails_at_most_its_in_flight_requests(self, cluster, serve_url: str) -> None:
        _, worker_ids = cluster
        client = httpx.Client(base_url=serve_url, timeout=60)
        victim_id, victim = next(iter(replicas_seen(client, 2).items()))
        png = png_bytes(random_image())
        results: list[_Result] = []
        stop = threading.Event()
        clients = [threading.Thread(target=_load, args=(serve_url, png, results, stop)) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        try:
            wait_until(lambda: len(results) >= 2 * CLIENTS, timeout_s=60, what="the load to get going")
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
            # Serve replaces the dead replica, on the node whose NPU it freed.
            replacement = replicas_seen(client, 2, exclude={victim_id})
            recovered_at = time.monotonic()
            wait_until(lambda: sum(r.sent > recovered_at for r in results) >= 4 * CLIENTS, 60, "load after recovery")
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
            client.close()

        failed = [r for r in results if r.status != 200]
        after = [r for r in results if r.sent > recovered_at]
        print(
            f"\n{len(results)} requests from {CLIENTS} clients; {len(failed)} failed when the replica was killed; "
            f"recovered in {recovered_at - killed_at:.1f}s; {len(after)} requests after recovery, all answered"
        )
        # Only the requests the dead replica held may fail: each client has at most one in flight.
        assert len(failed) <= CLIENTS
        for result in failed:  # reported as a retryable error, not a hang or a bare 500
            assert result.status == 503 and "died" in result.error, result
            assert result.sent < recovered_at
        assert all(r.status == 200 for r in after)
        assert sorted(r["node_id"] for r in replacement.values()) == sorted(worker_ids)


def test_tokenize_uses_both_nodes_and_writes_what_one_replica_computes(cluster, images, tmp_path) -> None:
    spec = PipelineSpec(
        TINY, device="cpu", preprocessing=Preprocessing(SIZE), batch_size=2, resources=NPU, replicas=2, progress=False
    )
    summary = tokenize_dataset(str(images), str(tmp_path / "out"), spec)

    _, worker_ids = cluster
    assert _nodes_of(summary.stats["last_run"]["replicas"]) == {node[:8] for node in worker_ids}
    assert (summary.rows, summary.errors, summary.missing) == (40, 1, 0)
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert errors[["path", "reason"]].values.tolist() == [[str(images / "d1" / "broken.png"), "not_an_image"]]

    # The rows one replica on one node computes (tests/test_tokenize.py pins single-node runs to this too).
    rows = pd.read_parquet(tmp_path / "out" / "data").set_index("path").sort_index()
    expected = VTPReplica(TINY, device="cpu", warmup_size=0).encode(np.stack([preprocess(p, SIZE) for p in rows.index]))
    for column in ("latents", "clip_embedding"):  # equal up to float noise: other batch compositions block GEMMs
        values = np.stack([np.asarray(v) for v in rows[column]])
        np.testing.assert_allclose(values, getattr(expected, column).reshape(len(values), -1), rtol=1e-5, atol=1e-6)


def test_a_replica_bigger_than_any_node_fails_at_once_though_the_cluster_sums_to_it(cluster, images, tmp_path) -> None:
    with pytest.raises(PlacementError, match="no node has that much"):
        tokenize_dataset(str(images), str(tmp_path / "out"), PipelineSpec(TINY, resources={"NPU": 2}, progress=False))
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlacementError, match=r"args\.placement.*no node has that much"):
        compose_app(AppSettings(model=TINY, placement={"resources": {"NPU": 2}}))


def test_a_worker_node_dying_mid_job_loses_and_repeats_nothing(cluster, images, tmp_path) -> None:
    head, _ = cluster
    output = tmp_path / "out"
    inputs = [str(images / "d0"), str(images / "d1" / "broken.png")]  # 20 images and the broken file
    args = [*inputs, "-o", str(output), "--model", TINY, "--size", str(SIZE), "--device", "cpu"]
    args += ["--resources", '{"NPU": 1}', "--replicas", "2", "--batch-size", "1", "--rows-per-file", "1"]
    args += ["--address", head.address, "--no-progress"]
    with (tmp_path / "log").open("w") as log_file:  # a file, not a pipe: nobody reads it while the job runs
        process = start_tokenize_cli(args, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_parts(output, 4, process)
        victim = next(node for node in head.worker_nodes)
        head.remove_node(victim, allow_graceful=False)  # the raylet and everything on it die at once
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert process.returncode == 0, log

    rows = pq.read_table(output / "data").column("path").to_pylist()
    errors = pq.read_table(output / "errors.parquet").column("path").to_pylist()
    assert len(rows) == len(set(rows)) == 20
    assert errors == [str(images / "d1" / "broken.png")]
    assert "21 inputs" in log and "20 rows, 1 error" in log
