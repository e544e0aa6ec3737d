"""The API against hostile clients: stalled uploads, uploads past the per-client cap, unauthenticated uploads, slow
readers and garbage, on real sockets over loopback against the Serve app (shared Ray, tiny model).

One application with an API key (the good clients and the stalled uploads send it; the limits hold with or without
one): a body has ``BODY_TIMEOUT_S`` to arrive, and one client address may send ``CAP`` bodies at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import SIZE, TINY, UNLIMITED, png_bytes, random_image
from hostile_clients import (
    HostileMix,
    post_request,
    raise_fd_limit,
    rss_mb,
    serve_pids,
    server_connections,
    soak,
    stalled_head,
)
from serving import REQUEST_TIMEOUT_S, ServeInstance, deploy
from starlette.datastructures import Headers

from deployments import AppSettings, compose_app
from deployments.api.uploads import client_address, has_body

BODY_TIMEOUT_S = 4.0
CAP = 8
REFUSAL_DELAY_S = 1.0
KEY = "hostile-key-0123"


# ------------------------------------------------------------------------------------------- fast: the helpers


def _scope(headers: dict[str, str], client: tuple[str, int] | None = ("10.0.0.9", 5000)) -> dict:
    return {"type": "http", "headers": Headers(headers).raw, "client": client}


def test_client_address_is_the_peer_or_the_load_balancers_last_entry() -> None:
    assert client_address(_scope({}), None) == "10.0.0.9"
    assert client_address(_scope({}, client=None), None) == "unknown"
    forwarded = _scope({"x-forwarded-for": "1.2.3.4, 198.51.100.7"})
    assert client_address(forwarded, "x-forwarded-for") == "198.51.100.7"  # the hop the trusted balancer added
    assert client_address(forwarded, None) == "10.0.0.9"  # a header is trusted only when configured
    assert client_address(_scope({}), "x-forwarded-for") == "10.0.0.9"


def test_has_body() -> None:
    assert has_body(_scope({"content-length": "3"}))
    assert has_body(_scope({"transfer-encoding": "chunked"}))
    assert not has_body(_scope({"content-length": "0"}))
    assert not has_body(_scope({}))


def test_config_knobs_are_validated() -> None:
    uploads = AppSettings(model=TINY).uploads
    assert (uploads.body_timeout_s, uploads.max_uploads_per_client, uploads.client_address_header) == (30.0, 32, None)
    assert uploads.refusal_delay_s == 5.0
    for bad in ({"body_timeout_s": 0}, {"max_uploads_per_client": -1}, {"upload_refusal_delay_s": -1}):
        with pytest.raises(ValueError):
            AppSettings(model=TINY, **bad)


# ------------------------------------------------------------------------------------------- slow: the app

AUTH = {"authorization": f"Bearer {KEY}"}
AUTH_LINE = f"authorization: Bearer {KEY}\r\n"


@pytest.fixture(scope="module")
def port(serve_instance: ServeInstance) -> int:
    assert REQUEST_TIMEOUT_S == 60  # the proxy's bound these tests rely on
    args = AppSettings(
        model=TINY,
        image_size=SIZE,
        placement="cpu",
        api_key=KEY,
        body_timeout_s=BODY_TIMEOUT_S,
        max_uploads_per_client=CAP,
        upload_refusal_delay_s=REFUSAL_DELAY_S,
        rate_limits=UNLIMITED,  # the upload limits alone (test_ratelimits.py has the rate limits)
    )
    deploy(compose_app(args), "vtp", "/")
    return serve_instance.http_port


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(random_image(SIZE, SIZE))


def _stalled(port: int, headers: str = AUTH_LINE, source: str = "127.0.1.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(stalled_head(extra_headers=headers))
    sock.settimeout(BODY_TIMEOUT_S + 30)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (fails if it keeps it open)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.slow
def test_stalled_uploads_get_408_at_the_deadline_and_past_the_cap_429_after_a_pause(port: int, png: bytes) -> None:
    started = time.monotonic()
    sockets = [_stalled(port, source="127.0.1.2") for _ in range(CAP + 2)]

    def answer(sock: socket.socket) -> tuple[str, bytes, float]:
        data = _answer(sock)  # ends with the server closing the connection
        return data.split(b" ")[1].decode(), data, time.monotonic() - started

    with ThreadPoolExecutor(len(sockets)) as pool:
        answers = pool.map(answer, sockets)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=AUTH) as good:
            response = good.post("/v1/embed", content=png, headers={"content-type": "image/png"})
        assert response.status_code == 200  # another client is not affected by this one's stalled uploads
        answers = list(answers)
    assert sorted(status for status, _, _ in answers) == ["408"] * CAP + ["429"] * 2
    timed_out = [(data, at) for status, data, at in answers if status == "408"]
    assert b'"error":' in timed_out[0][0] and b"body_timeout_s" in timed_out[0][0]
    assert all(BODY_TIMEOUT_S - 0.5 <= at < BODY_TIMEOUT_S + 30 for _, at in timed_out)
    # Past the cap: 429 after the refusal pause, longer for each refusal the client already has waiting (a client
    # reconnecting at once cannot make it spin), before the deadline, and never reading the body.
    refused = sorted(((data, at) for status, data, at in answers if status == "429"), key=lambda answer: answer[1])
    assert b"max_uploads_per_client" in refused[0][0] and b"retry-after: 1" in refused[0][0].lower()
    times = [at for _, at in refused]
    assert times[0] >= REFUSAL_DELAY_S - 0.1 and 2 * REFUSAL_DELAY_S - 0.1 <= times[1] < BODY_TIMEOUT_S - 0.5, times


@pytest.mark.slow
@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer wrong\r\n", "Authorization: Basic eDp5\r\n"])
def test_without_a_valid_key_an_upload_is_refused_before_its_body(port: int, authorization: str) -> None:
    started = time.monotonic()
    answer = _answer(_stalled(port, authorization))
    assert answer.startswith(b"HTTP/1.1 401 ") and b"API key" in answer
    assert time.monotonic() - started < BODY_TIMEOUT_S  # answered without waiting for the body it never sends


@pytest.mark.slow
def test_a_slow_but_steady_upload_inside_the_deadline_is_served(port: int, png: bytes) -> None:
    async def trickle() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = post_request("/v1/embed", png, extra_headers=AUTH_LINE)
        head, body = request[: len(request) - len(png)], png
        writer.write(head)
        pieces = 8
        for i in range(pieces):  # the whole body over about half the deadline
            writer.write(body[i * len(body) // pieces : (i + 1) * len(body) // pieces])
            await writer.drain()
            await asyncio.sleep(BODY_TIMEOUT_S / 2 / pieces)
        answer = await asyncio.wait_for(reader.read(-1), 60)
        writer.close()
        return answer

    answer = asyncio.run(trickle())
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"embedding":' in answer


# ------------------------------------------------------------------------------------------- the soak

SOAK_S = 15.0
MIX = HostileMix(stalled=240, stalled_addresses=6, slow_readers=40, garbage=3)
P99_BOUND_MS = BODY_TIMEOUT_S * 1000  # a good request never waits behind a stalled upload's deadline
RSS_GROWTH_BOUND_MB = 300


@pytest.mark.slow
@pytest.mark.soak
def test_soak_good_clients_are_served_while_hostile_clients_run(port: int, png: bytes) -> None:
    raise_fd_limit(4096)
    pids = serve_pids("vtp", "VTPIngress")
    before = {kind: rss_mb(pid) for kind, pid in pids.items()}
    report = asyncio.run(soak(port, png, MIX, SOAK_S, good_clients=4, allowed_s=BODY_TIMEOUT_S + 10, headers=AUTH))

    # Nothing good lost, and good requests never queued behind the stalled ones.
    assert report.good_failures == []
    assert len(report.good_ms) >= 20
    assert report.percentile_ms(99) < P99_BOUND_MS, report.percentile_ms(99)
    # Every stalled upload was let go within its deadline (or refused at once), by the server itself.
    assert set(report.stalled) <= {"408", "429"} and report.stalled["408"] >= MIX.stalled_addresses * CAP
    assert report.stalled["429"] > 0
    assert report.stalled_longest_s < BODY_TIMEOUT_S + 10
    assert report.stalled_open_at_end == 0
    assert report.slow_readers["sent"] == MIX.slow_readers
    assert report.garbage and all(status.startswith("4") for status in report.garbage), report.garbage
    # Memory stayed bounded (Linux peak resident set of the proxy and the ingress).
    for kind, pid in pids.items():
        assert rss_mb(pid, "VmHWM") - before[kind] < RSS_GROWTH_BOUND_MB, kind

    # Afterwards every slot is free: the server holds no connection, and a hostile address may upload again.
    deadline = time.monotonic() + 30
    while server_connections(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server_connections(port) == 0
    assert [r.status_code for r in asyncio.run(_uploads_at_once(port, png, "127.0.1.1", CAP))] == [200] * CAP


async def _uploads_at_once(port: int, png: bytes, source: str, count: int) -> list[httpx.Response]:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, transport=transport, headers=AUTH
    ) as client:
        image = {"content": png, "headers": {"content-type": "image/png"}}
        return await asyncio.gather(*(client.post("/v1/embed", **image) for _ in range(count)))
