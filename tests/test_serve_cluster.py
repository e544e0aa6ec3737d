"""Two model replicas pinned to (declared) NPUs, the API key, and a replica killed under load.

Ray started with ``resources={"NPU": 2}`` hands each actor that asks for ``{"NPU": 1}`` its own
``ASCEND_RT_VISIBLE_DEVICES``, without Ascend hardware; the replicas compute on the CPU (``device="cpu"``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from test_serve import SIZE, TINY, png_bytes, random_image, start_serve, stop_serve, wait_until

from deployments import AppArgs, compose_app

KEY = "test-key-0123"
AUTH = {"authorization": f"Bearer {KEY}"}
CLIENTS = 4


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    url = start_serve(num_cpus=4, resources={"NPU": 2})
    args = AppArgs(
        model=TINY,
        image_size=SIZE,
        placement={"resources": {"NPU": 1}},
        device="cpu",
        api_key=KEY,
        batch_wait_timeout_s=0.01,
    )
    # health_check_period_s: notice a killed replica within a second rather than ten.
    serve.run(compose_app(args, num_replicas=2, health_check_period_s=1), name="vtp", route_prefix="/")
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
        yield c
    stop_serve()


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(random_image())


def replicas_seen(client: httpx.Client, want: int, exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Ask /v1/model until ``want`` different live replicas (not in ``exclude``) have answered."""
    seen: dict[str, dict[str, Any]] = {}

    def enough() -> bool:
        for _ in range(10):
            response = client.get("/v1/model")
            info = response.json()["replica"] if response.status_code == 200 else None
            if info and info["id"] not in exclude:
                seen[info["id"]] = info
        return len(seen) >= want

    wait_until(enough, timeout_s=60, what=f"{want} replicas answering /v1/model")
    return seen


def test_each_replica_sees_its_own_npu(client: httpx.Client) -> None:
    replicas = replicas_seen(client, 2)
    assert sorted(r["visible_devices"]["ASCEND_RT_VISIBLE_DEVICES"] for r in replicas.values()) == ["0", "1"]
    assert sorted(r["accelerator_ids"]["NPU"][0] for r in replicas.values()) == ["0", "1"]


def test_api_key_guards_v1_but_not_healthz(client: httpx.Client, png: bytes) -> None:
    image = {"content": png, "headers": {"content-type": "image/png"}}
    with httpx.Client(base_url=client.base_url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            response = anonymous.get("/v1/model", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
        # Refused before the body is looked at: a bad body still gets 401, not 400.
        response = anonymous.post("/v1/embed", content=b"not an image", headers={"content-type": "image/png"})
        assert response.status_code == 401
    assert client.get("/v1/model").status_code == 200
    assert client.post("/v1/embed", **image).status_code == 200


@dataclass(frozen=True)
class _Result:
    sent: float
    status: int
    error: str | None


def _load(base_url: str, png: bytes, results: list[_Result], stop: threading.Event) -> None:
    """One client sending /v1/embed back to back until ``stop``."""
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as client:
        while not stop.is_set():
            sent = time.monotonic()
            response = client.post("/v1/embed", content=png, headers={"content-type": "image/png"})
            results.append(_Result(sent, response.status_code, response.json().get("error")))


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_at_most_its_in_flight_requests(client: httpx.Client, png: bytes) -> None:
    victim_id, victim = next(iter(replicas_seen(client, 2).items()))
    results: list[_Result] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(str(client.base_url), png, results, stop)) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(results) >= 2 * CLIENTS, timeout_s=60, what="the load to get going")
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        # Serve replaces the dead replica; the new one gets the NPU the dead one freed.
        replacement = replicas_seen(client, 2, exclude={victim_id})
        recovered_at = time.monotonic()
        wait_until(lambda: sum(r.sent > recovered_at for r in results) >= 4 * CLIENTS, 60, "traffic after recovery")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    failed = [r for r in results if r.status != 200]
    after = [r for r in results if r.sent > recovered_at]
    print(
        f"\n{len(results)} requests from {CLIENTS} clients; {len(failed)} failed when the replica was killed; "
        f"recovered in {recovered_at - killed_at:.1f}s; {len(after)} requests after recovery, all answered"
    )
    # Only the requests the dead replica held fail: each client has at most one in flight.
    assert len(failed) <= CLIENTS
    for result in failed:  # reported as a retryable error, not a hang or a bare 500
        assert result.status == 503 and "died" in result.error, result
        assert killed_at - 60 < result.sent < recovered_at
    assert all(r.status == 200 for r in after)
    npus = sorted(r["visible_devices"]["ASCEND_RT_VISIBLE_DEVICES"] for r in replacement.values())
    assert npus == ["0", "1"]
