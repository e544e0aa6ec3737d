"""Hostile HTTP clients on raw asyncio sockets, and good clients measured beside them (``hostile_load.py`` and
the soak test ``tests/test_hostile.py`` share them; pytest finds this directory through ``pythonpath``).

Every hostile client binds its own loopback source address (``127.0.0.N``; Linux routes all of 127/8 to the
loopback interface), so the server sees them as other clients than the good ones on 127.0.0.1, as it would on a
network. Everything stops by itself at ``end`` (a ``loop.time()``), and every socket opened here is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class SoakReport:
    """What the good and hostile clients saw."""

    good_ms: list[float] = field(default_factory=list)  # latency of each good request answered 200
    good_failures: list[str] = field(default_factory=list)  # every good request not answered 200, and why
    stalled: Counter[str] = field(default_factory=Counter)  # how each stalled upload ended: 408, 429 (upload cap),
    # "429 rate" (a rate limit), ...
    stalled_longest_s: float = 0.0  # the longest any stalled upload was held before the server let it go
    stalled_open_at_end: int = 0  # stalled uploads the server still held when the soak ended (longer than allowed)
    slow_readers: Counter[str] = field(default_factory=Counter)  # sent, refused
    garbage: Counter[str] = field(default_factory=Counter)  # status of each garbage request (or "closed")
    elapsed_s: float = 0.0

    @property
    def good_throughput(self) -> float:
        return len(self.good_ms) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.good_ms, q)) if self.good_ms else float("nan")


@dataclass(frozen=True)
class HostileMix:
    """How many hostile clients of each kind run at once, and from how many source addresses."""

    stalled: int = 0  # connections that announce a body, send 3 bytes of it and stall (reconnecting when answered)
    stalled_addresses: int = 1
    slow_readers: int = 0  # connections that send pipelined requests for 8 API schemas and never read the answers
    garbage: int = 0  # loops of malformed requests, each answered before the next
    garbage_addresses: int = 1


def raise_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` (up to the hard limit); fails if that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise RuntimeError(f"open-file limit {hard} is below the {needed} this load needs (ulimit -n)")


async def _open(port: int, source: str, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=2**20)


async def _answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[str, bytes]:
    """Read until the server closes: its status code (or ``closed``) and all it sent."""
    data = await asyncio.wait_for(reader.read(-1), timeout_s)
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
    return status, data


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


def stalled_head(path: str = "/v1/embed", extra_headers: str = "") -> bytes:
    """A request that announces a 100 kB image and sends its first 3 bytes."""
    head = f"POST {path} HTTP/1.1\r\nHost: vtp\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n"
    return f"{head}{extra_headers}\r\n".encode() + b"\x89PN"


async def stalled_upload(port: int, source: str, end: float, head: bytes, allowed_s: float, report: SoakReport) -> None:
    """Send ``head`` (``stalled_head``) and stall; when the server answers (or closes), start again."""
    loop = asyncio.get_running_loop()
    while loop.time() < end:
        try:
            reader, writer = await _open(port, source)
        except OSError:
            report.stalled["connect_error"] += 1
            await asyncio.sleep(0.5)
            continue
        started = loop.time()
        try:
            writer.write(head)
            status, data = await _answer(reader, max(end - loop.time(), 0.01))
            report.stalled["429 rate" if status == "429" and b"rate limit" in data else status] += 1
            report.stalled_longest_s = max(report.stalled_longest_s, loop.time() - started)
            if status == "429":
                await asyncio.sleep(0.5)  # refused at once: come back soon, as a patient attacker would
        except asyncio.TimeoutError:  # the soak ended with this one still held
            if loop.time() - started > allowed_s:
                report.stalled_open_at_end += 1
        except OSError:
            report.stalled["reset"] += 1
        finally:
            _close(writer)


async def slow_reader(port: int, source: str, end: float, request: bytes, report: SoakReport) -> None:
    """Send ``request`` (requests whose answers together are large) with a tiny receive buffer; never read."""
    try:
        _, writer = await _open(port, source, rcvbuf=4096)
    except OSError:
        report.slow_readers["connect_error"] += 1
        return
    try:
        writer.write(request)
        report.slow_readers["sent"] += 1
        await asyncio.sleep(max(end - asyncio.get_running_loop().time(), 0))
    finally:
        _close(writer)


def post_request(
    path: str, body: bytes, content_type: str = "image/png", extra_headers: str = "", close: bool = True
) -> bytes:
    """A whole POST request; with ``close``, on a connection the server closes after answering."""
    head = f"POST {path} HTTP/1.1\r\nHost: vtp\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    connection = "Connection: close\r\n" if close else ""
    return f"{head}{extra_headers}{connection}\r\n".encode() + body


def garbage_requests(png: bytes, extra_headers: str = "") -> list[bytes]:
    """Cheap malformed requests, each answered 4xx by the proxy or the ingress."""

    def post(path: str, body: bytes, content_type: str = "image/png") -> bytes:
        return post_request(path, body, content_type, extra_headers)

    return [
        b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n",
        post("/v1/embed", b"this is text, not an image"),
        post("/v1/embed?size=abc", png),
        post("/v1/embed?size=4096", png),
        post("/v1/embed", png, content_type="text/plain"),
        post("/v1/decode", b'{"shape": [-1, 2, 2], "dtype": "float32", "latents": "AA=="}', "application/json"),
        b"GET /nowhere HTTP/1.1\r\nHost: vtp\r\nConnection: close\r\n\r\n",
    ]


async def garbage(port: int, source: str, end: float, requests: list[bytes], report: SoakReport) -> None:
    """Send malformed requests one after the other, each on a new connection, reading each answer."""
    loop = asyncio.get_running_loop()
    index = 0
    while loop.time() < end:
        try:
            reader, writer = await _open(port, source)
        except OSError:
            report.garbage["connect_error"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(requests[index % len(requests)])
            status, _ = await _answer(reader, 30)
            report.garbage[status] += 1
        except (OSError, asyncio.TimeoutError) as e:
            report.garbage[type(e).__name__] += 1
        finally:
            _close(writer)
        index += 1
        await asyncio.sleep(0.05)


async def good_client(
    client: httpx.AsyncClient, png: bytes, end: float, headers: dict[str, str], report: SoakReport
) -> None:
    """POST /v1/embed one request at a time until ``end``; every answer is checked and timed."""
    while asyncio.get_running_loop().time() < end:
        started = time.perf_counter()
        try:
            response = await client.post("/v1/embed", content=png, headers={"content-type": "image/png", **headers})
        except httpx.HTTPError as e:
            report.good_failures.append(f"{type(e).__name__}: {e}")
            continue
        if response.status_code == 200 and len(response.json()["embedding"]) == response.json()["dim"]:
            report.good_ms.append((time.perf_counter() - started) * 1000)
        else:
            report.good_failures.append(f"{response.status_code}: {response.text[:200]}")


async def soak(
    port: int,
    png: bytes,
    mix: HostileMix,
    duration_s: float,
    good_clients: int,
    allowed_s: float,
    headers: dict[str, str] | None = None,
) -> SoakReport:
    """Good clients, each on a loopback address of its own (127.0.0.1, .2, ...), for ``duration_s`` while ``mix``
    runs from other loopback addresses (stalled uploads 127.0.1.x, slow readers 127.0.2.1, garbage 127.0.3.x);
    every request (hostile ones too) carries ``headers`` (e.g. the API key)."""
    loop = asyncio.get_running_loop()
    headers = headers or {}
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    report = SoakReport()
    started = loop.time()
    end = started + duration_s
    head = stalled_head(extra_headers=extra)
    # Pipelined: no model work, but the proxy must write more answers than the reader's buffers take.
    big_answer = b"GET /openapi.json HTTP/1.1\r\nHost: vtp\r\n\r\n" * 8  # 8 x 15 kB
    tasks = [
        stalled_upload(port, f"127.0.1.{1 + i % mix.stalled_addresses}", end, head, allowed_s, report)
        for i in range(mix.stalled)
    ]
    tasks += [slow_reader(port, "127.0.2.1", end, big_answer, report) for _ in range(mix.slow_readers)]
    tasks += [
        garbage(port, f"127.0.3.{1 + i % mix.garbage_addresses}", end, garbage_requests(png, extra), report)
        for i in range(mix.garbage)
    ]
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    timeout=60,
                    transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{1 + i}"),
                )
            )
            for i in range(good_clients)
        ]
        await asyncio.gather(*tasks, *(good_client(client, png, end, headers, report) for client in clients))
    report.elapsed_s = loop.time() - started
    return report


async def address_flood(port: int, count: int, header: str, concurrency: int = 32) -> Counter[str]:
    """``count`` GET /healthz requests, each from another client address as a load balancer would say it (the
    last entry of ``header``: 10.x.y.z), over ``concurrency`` keep-alive connections from 127.0.5.1. Returns the
    answers' statuses."""
    statuses: Counter[str] = Counter()
    queue = iter(range(count))
    transport = httpx.AsyncHTTPTransport(local_address="127.0.5.1")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, transport=transport) as client:

        async def worker() -> None:
            for i in queue:
                address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
                try:
                    response = await client.get("/healthz", headers={header: f"192.0.2.1, {address}"})
                    statuses[str(response.status_code)] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def server_connections(port: int) -> int:
    """TCP connections the server on ``port`` holds (Linux /proc; every state but LISTEN and TIME_WAIT)."""
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state not in ("0A", "06"):
                    held += 1
    return held


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``) or its peak (``VmHWM``), in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {field_name} for process {pid}")


def serve_pids(app_name: str, *deployments: str) -> dict[str, int]:
    """The process ids of this node's Serve proxy and of each of ``deployments``' replicas (Ray's own actor
    registry), by kind: ``proxy`` and the deployment names (one replica each)."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        kind = "proxy" if name.startswith("SERVE_PROXY_ACTOR") else None
        for deployment in deployments:
            if name.startswith(f"SERVE_REPLICA::{app_name}#{deployment}#"):
                kind = deployment
        if kind is not None:
            handle = ray.get_actor(name, namespace=actor["namespace"])
            pids[kind] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return pids


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each of ``pids`` (by kind), by this process (``load generator``:
    the clients, and Ray's driver threads) and by every other process this one started (``other Ray``: GCS,
    raylet, Serve's controller, idle workers)."""
    import psutil

    me = psutil.Process()
    used = {kind: sum(psutil.Process(pid).cpu_times()[:2]) for kind, pid in pids.items()}
    used["load generator"] = sum(me.cpu_times()[:2])
    known = set(pids.values())
    other = 0.0
    for child in me.children(recursive=True):
        if child.pid not in known:
            with contextlib.suppress(psutil.Error):
                other += sum(child.cpu_times()[:2])
    used["other Ray"] = other
    return used


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine have been busy since boot (every process, ours or not; /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
