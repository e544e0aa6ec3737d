"""Two model replicas pinned to (declared) NPUs, and the API key.

Ray started with ``resources={"NPU": 2}`` hands each actor that asks for ``{"NPU": 1}`` its own
``ASCEND_RT_VISIBLE_DEVICES``, without Ascend hardware; the replicas compute on the CPU (``device="cpu"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ray import serve
from test_serve import SIZE, TINY, png_bytes, random_image, start_serve, stop_serve, wait_until

from deployments import AppArgs, compose_app

KEY = "test-key-0123"
AUTH = {"authorization": f"Bearer {KEY}"}


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
    serve.run(compose_app(args, num_replicas=2), name="vtp", route_prefix="/")
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
