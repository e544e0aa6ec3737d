"""The hostile-clients soak as a benchmark: good clients with and without hostile load, side by side in one run.

One local Ray (2 CPUs) runs the Serve application with ``body_timeout_s`` and ``max_uploads_per_client`` as given
and the rate limits at their defaults (``--rate-limits off``: none, as before they existed). Good clients, each on
a loopback address of its own (127.0.0.1, .2, ...), POST ``/v1/embed`` one request at a time, first alone (clean),
then while hundreds of stalled uploads (from 8 loopback addresses, reconnecting whenever answered), slow readers
(a large answer, never read) and garbage requests run, each kind of attacker from addresses of its own (hostile).
It prints good-request throughput, p50 / p99 and failures for both phases and their ratios (goals: throughput >=
0.8 of clean, p99 within 2x), how the stalled uploads ended, what the garbage got, the connections the server still
held afterwards (goal 0), the CPU each process used in each phase (the proxy, the ingress, the model replica, this
load generator, the rest of Ray, and the whole machine: where the good clients' throughput went) and the peak RSS
of the proxy and the ingress. The clean phase runs before and after the hostile one and the two are pooled (the
machine's background load drifts).

Then a flood of ``--flood`` distinct client addresses (``x-forwarded-for``, the app's ``client_address_header``)
asks ``/healthz`` once each: the ingress's RSS after each half (goal: flat; the clients it remembers are capped at
``rate_limits.max_clients``). Last, what the body deadline costs legitimate uploads on slow links: large images
uploaded at throttled rates around ``size / body_timeout_s`` (all at once), each with its transfer time, answer and
latency.

    PYTHONPATH=. python benchmarks/hostile_load.py                        # random:vtp-small, 256 px
    PYTHONPATH=. python benchmarks/hostile_load.py --rate-limits off      # the same without rate limits
    PYTHONPATH=. python benchmarks/hostile_load.py --direct-ingress       # every client past the proxy
    PYTHONPATH=. python benchmarks/hostile_load.py --model tests/fixtures/vtp-tiny --size 64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections import Counter

import numpy as np
import ray
from _common import NO_RATE_LIMITS, enable_direct_ingress, free_port, png_bytes
from hostile_clients import (
    HostileMix,
    SoakReport,
    address_flood,
    cpu_seconds,
    machine_busy_seconds,
    raise_fd_limit,
    rss_mb,
    serve_pids,
    server_connections,
    soak,
)
from ray import serve

from deployments import AppSettings, compose_app
from deployments.settings import RateLimits

FLOOD_HEADER = "x-forwarded-for"


class _Phases:
    """Runs soak phases and keeps the CPU each process used in each (seconds), and the machine's busy seconds."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu: dict[str, dict[str, float]] = {}

    def run(self, name: str, *soak_args: object) -> SoakReport:
        before, busy = cpu_seconds(self.pids), machine_busy_seconds()
        report = asyncio.run(soak(*soak_args))
        after = cpu_seconds(self.pids)
        self.cpu[name] = {kind: after[kind] - before[kind] for kind in after}
        self.cpu[name]["machine (all processes)"] = machine_busy_seconds() - busy
        self.cpu[name]["seconds"] = report.elapsed_s
        return report

    def table(self, names: list[str], good: dict[str, int]) -> str:
        """CPU by process: cores used (CPU s per s) in each phase, and CPU ms per good request."""
        kinds = [k for k in self.cpu[names[0]] if k != "seconds"]
        head = f"{'CPU: cores used (ms per good request)':40s}" + "".join(f"{n:>22s}" for n in names)
        rows = [head]
        for kind in kinds:
            cells = []
            for n in names:
                used, seconds = self.cpu[n][kind], self.cpu[n]["seconds"]
                cells.append(f"{used / seconds:8.2f} ({1000 * used / max(good[n], 1):7.0f} ms)")
            rows.append(f"{kind:40s}" + "".join(f"{c:>22s}" for c in cells))
        return "\n".join(rows)


def _line(name: str, report: SoakReport) -> str:
    return (
        f"{name:8s} {len(report.good_ms):6d} {len(report.good_failures):6d} {report.good_throughput:8.2f} "
        f"{report.percentile_ms(50):8.0f} {report.percentile_ms(99):8.0f}"
    )


async def _read_all(reader: asyncio.StreamReader, into: bytearray) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            into += chunk


async def _throttled_upload(port: int, body: bytes, rate: float) -> tuple[float, str, float]:
    """Upload ``body`` at ``rate`` bytes/s: (seconds the transfer took, status, seconds until the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = bytearray()
    reading = asyncio.create_task(_read_all(reader, answer))  # an early answer (408) is read as it comes
    head = f"POST /v1/embed HTTP/1.1\r\nHost: vtp\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n"
    started = time.perf_counter()
    writer.write(head.encode() + b"Connection: close\r\n\r\n")
    step = max(int(rate / 10), 1)
    sent = 0
    with contextlib.suppress(ConnectionError):  # refused (408) and closed while still sending
        while sent < len(body) and not reading.done():
            writer.write(body[sent : sent + step])
            await writer.drain()
            sent += step
            await asyncio.sleep(max(started + sent / rate - time.perf_counter(), 0))
    transfer = time.perf_counter() - started
    await asyncio.wait_for(reading, 600)
    writer.close()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    return transfer, status, time.perf_counter() - started


async def _slow_links(port: int, body: bytes, rates: list[float]) -> list[tuple[float, str, float]]:
    return await asyncio.gather(*(_throttled_upload(port, body, rate) for rate in rates))


def _wait_answering(port: int, timeout_s: float = 60) -> None:
    """Until the app answers ``/healthz`` on ``port`` (a direct-ingress port opens a moment after ``serve.run``)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing answers /healthz on port {port} after {timeout_s:g} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--size", type=int, default=256, help="model input side (and the good clients' image)")
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase")
    parser.add_argument("--good-clients", type=int, default=4)
    parser.add_argument("--stalled", type=int, default=400, help="stalled uploads held open at once")
    parser.add_argument("--stalled-addresses", type=int, default=8)
    parser.add_argument("--slow-readers", type=int, default=100)
    parser.add_argument("--garbage", type=int, default=4, help="loops sending malformed requests")
    parser.add_argument("--garbage-addresses", type=int, default=1, help="loopback addresses the loops share")
    parser.add_argument(
        "--rate-limits", choices=("default", "off"), default="default", help="the app's rate_limits (off: as before)"
    )
    parser.add_argument("--flood", type=int, default=10_000, help="distinct client addresses of the flood (0: none)")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="body_timeout_s (shorter than a phase)")
    parser.add_argument("--max-uploads-per-client", type=int, default=32)
    parser.add_argument("--upload-mb", type=float, default=1.0, help="image size of the slow-link uploads")
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="every client (good and hostile) on the ingress replica's own port: no Serve proxy in the path",
    )
    args = parser.parse_args()

    raise_fd_limit(4 * (args.stalled + args.slow_readers) + 1024)
    direct_port = enable_direct_ingress() if args.direct_ingress else None
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    proxy_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port, "request_timeout_s": 120})
    app_args = AppSettings(
        model=args.model,
        image_size=args.size,
        placement="cpu",
        body_timeout_s=args.body_timeout,
        max_uploads_per_client=args.max_uploads_per_client,
        client_address_header=FLOOD_HEADER,  # the flood's addresses; the other clients send none: their peer counts
        rate_limits=RateLimits() if args.rate_limits == "default" else NO_RATE_LIMITS,
    )
    serve.run(compose_app(app_args), name="vtp", route_prefix="/")
    port = direct_port or proxy_port
    _wait_answering(port)
    png = png_bytes(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    pids = serve_pids("vtp", "VTPIngress", "VTPReplica")
    phases = _Phases(pids)
    rss_start = {kind: rss_mb(pid) for kind, pid in pids.items()}
    mix = HostileMix(args.stalled, args.stalled_addresses, args.slow_readers, args.garbage, args.garbage_addresses)
    allowed = args.body_timeout + 10

    asyncio.run(soak(port, png, HostileMix(), 3, args.good_clients, allowed))  # warm-up
    # clean, hostile, clean: the hostile phase is compared with the mean of the clean phases around it, so that a
    # change in the machine's background load shifts both sides alike
    before = phases.run("clean 1", port, png, HostileMix(), args.seconds, args.good_clients, allowed)
    peak_clean = {kind: rss_mb(pid, "VmHWM") for kind, pid in pids.items()}
    hostile = phases.run("hostile", port, png, mix, args.seconds, args.good_clients, allowed)
    peak_hostile = {kind: rss_mb(pid, "VmHWM") for kind, pid in pids.items()}
    time.sleep(3)
    held_after = server_connections(port)
    after = phases.run("clean 2", port, png, HostileMix(), args.seconds, args.good_clients, allowed)
    clean = SoakReport(good_ms=before.good_ms + after.good_ms, elapsed_s=before.elapsed_s + after.elapsed_s)
    clean.good_failures = before.good_failures + after.good_failures
    flood: list[tuple[int, float, Counter[str]]] = []  # (addresses so far, ingress RSS MB, statuses)
    if args.flood:
        ingress = pids["VTPIngress"]
        flood.append((0, rss_mb(ingress), Counter()))
        for _ in range(2):  # two halves: the growth of the second shows whether memory stays flat
            statuses = asyncio.run(address_flood(port, args.flood // 2, FLOOD_HEADER))
            flood.append((flood[-1][0] + args.flood // 2, rss_mb(ingress), statuses))
    limits = app_args.rate_limits

    print(f"\nmodel {args.model} at {args.size} px, body_timeout_s {args.body_timeout:g}, ", end="")
    print(f"max_uploads_per_client {args.max_uploads_per_client}, {args.good_clients} good clients, {args.seconds:g} s")
    print("path: " + ("the ingress replica's own port (direct ingress)" if direct_port else "Serve's proxy"))
    budgets = "off" if not limits.model.rate else f"model {limits.model.rate:g}/s (burst {limits.model.burst}), "
    if limits.model.rate:
        budgets += f"cheap {limits.cheap.rate:g}/s (burst {limits.cheap.burst}), refusal_delay_s "
        budgets += f"{limits.refusal_delay_s:g} (at most {limits.max_refusal_delay_s:g}), "
        budgets += f"max_pending_refusals {limits.max_pending_refusals}"
    print(f"rate limits per client: {budgets}")
    print(f"hostile: {mix}")
    print(f"\n{'phase':8s} {'good':>6s} {'failed':>6s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(_line("clean 1", before))
    print(_line("hostile", hostile))
    print(_line("clean 2", after))
    print(_line("clean", clean))
    print(
        f"ratio: throughput {hostile.good_throughput / clean.good_throughput:.2f} (goal >= 0.8), "
        f"p99 {hostile.percentile_ms(99) / clean.percentile_ms(99):.2f}x (goal <= 2)"
    )
    print(f"good failures (hostile phase): {hostile.good_failures[:5]}")
    print(f"stalled uploads ended: {dict(hostile.stalled)}, longest held {hostile.stalled_longest_s:.1f} s, ", end="")
    print(f"held past the deadline at the end {hostile.stalled_open_at_end} (goal 0)")
    print(f"slow readers: {dict(hostile.slow_readers)}; garbage answers: {dict(hostile.garbage)}")
    print(f"server connections held 3 s after the clients left: {held_after} (goal 0)")
    good = {"clean 1": len(before.good_ms), "hostile": len(hostile.good_ms), "clean 2": len(after.good_ms)}
    print("\n" + phases.table(["clean 1", "hostile", "clean 2"], good) + "\n")
    for kind in pids:
        print(
            f"RSS {kind}: {rss_start[kind]:.0f} MB at start, peak {peak_clean[kind]:.0f} MB after clean 1, "
            f"{peak_hostile[kind]:.0f} MB after hostile"
        )

    side = int((args.upload_mb * 2**20 / 3) ** 0.5)  # noise PNGs barely compress: about 3 bytes a pixel
    body = png_bytes(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))
    needed = len(body) / args.body_timeout
    fractions = [0.5, 0.9, 1.25]
    results = asyncio.run(_slow_links(port, body, [needed / f for f in fractions]))
    mib, mbit = len(body) / 2**20, needed * 8 / 1e6
    print(f"\nslow links: a {mib:.2f} MiB image needs {mbit:.2f} Mbit/s to arrive in {args.body_timeout:g} s")
    print(f"{'link Mbit/s':>12s} {'transfer s':>11s} {'status':>7s} {'answered s':>11s} {'after body ms':>14s}")
    for fraction, (transfer, status, answered) in zip(fractions, results, strict=True):
        rate = needed / fraction * 8 / 1e6
        print(f"{rate:12.2f} {transfer:11.1f} {status:>7s} {answered:11.1f} {(answered - transfer) * 1000:14.0f}")
    if flood:
        print(f"\nflood of distinct client addresses ({FLOOD_HEADER}, GET /healthz), max_clients {limits.max_clients}:")
        for count, rss, statuses in flood:
            print(f"  after {count:6d} addresses: ingress RSS {rss:.1f} MB {dict(statuses) if statuses else ''}")
        growth = [flood[i + 1][1] - flood[i][1] for i in range(len(flood) - 1)]
        print(f"  growth per half: {', '.join(f'{g:+.1f} MB' for g in growth)} (goal: flat)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
