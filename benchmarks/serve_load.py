"""Load test of the Serve application over loopback HTTP, next to ``VTPReplica`` called directly.

One run starts a local Ray with the application and, beside it, ``VTPReplica`` in a Ray actor of the same kind as
the Serve replica's (same model, precision, CPUs and torch threads), timed inside that actor: no hop. Then, for
each client count, that many concurrent HTTP clients send one request at a time until ``--requests`` have
completed or the time limit passes; throughput, p50 / p99 latency, the mean ``x-vtp-batch-size`` and each
request's overhead are reported: its latency less the model time the replica reports for it in ``Server-Timing``
(drift-free: both come from the same request). Right before and after each client count the direct replica is
timed at batch 1 (latency) and at ``--max-batch-size`` (throughput), and the HTTP figures are compared with the
mean of the two, so drift in background load shifts both sides alike.

``--direct-ingress`` starts Serve with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` and measures, at each client count,
both the path through Serve's HTTP proxy and the ingress replica's own HTTP port (no proxy process in between).

Wall-clock figures need a machine to themselves. CPU seconds per image (user + system, summed over this
process and every process it started: Ray, the proxy, both deployments; Linux /proc) do not, and show the
serving overhead even when other jobs share the cores. Both replicas set OpenMP's waiting the same way
(``vtp_ray.placement.brief_openmp_waits``, unless this environment sets it).

    PYTHONPATH=. python benchmarks/serve_load.py                      # random:vtp-small, fp32, 1 and 16 clients
    PYTHONPATH=. python benchmarks/serve_load.py --endpoint encode --clients 1 4 16 --requests 16 32 64
    PYTHONPATH=. python benchmarks/serve_load.py --direct-ingress       # also the proxy-less path, side by side
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import httpx
import numpy as np
import ray
from _common import NO_RATE_LIMITS, enable_direct_ingress, free_port
from PIL import Image
from ray import serve

from deployments import AppSettings, compose_app
from vtp_ray.images import preprocess
from vtp_ray.placement import OPENMP_WAIT_VARS, brief_openmp_waits

# HTTP endpoint -> the VTPReplica verb it runs.
VERBS = {"reconstruct": "reconstruct", "encode": "encode", "embed": "embed"}


@dataclass
class Direct:
    """``VTPReplica`` timings: batch-1 p50 latency, and throughput and CPU seconds per image at each batch size."""

    p50_ms: float
    images_per_s: float
    cpu_s_per_image_b1: float
    cpu_s_per_image: float

    @staticmethod
    def mean(a: Direct, b: Direct) -> Direct:
        return Direct(*((x + y) / 2 for x, y in zip(astuple(a), astuple(b), strict=True)))


@dataclass
class Level:
    """One client count's HTTP results."""

    clients: int
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # from the Server-Timing header
    role_cpu_s: dict[str, float] = field(default_factory=dict)  # per Serve process role: proxy, ingress, replica

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def cpu_s_per_image(self) -> float:
        return self.cpu_s / len(self.latencies_ms)

    def overhead_ms(self, q: float) -> float:
        """Percentile ``q`` of each request's latency less its model time (``Server-Timing``)."""
        model = self.stages_ms.get("model", [])
        if len(model) != len(self.latencies_ms) or not model:
            return float("nan")
        return float(np.percentile(np.subtract(self.latencies_ms, model), q))


def tree_cpu_s(root: int | None = None) -> float:
    """User + system CPU seconds of ``root`` (default: this process) and all its live descendants (Linux)."""
    parent, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
    tree, frontier = set(), [root or os.getpid()]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier += [child for child, ppid in parent.items() if ppid == pid and child not in tree]
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


# Ray titles each actor process "ray::<actor class>": Serve's HTTP proxy, the ingress and the model replicas.
ROLES = {"proxy": "ProxyActor", "ingress": "VTPIngress", "replica": "VTPReplica"}


def serve_pids() -> dict[str, list[int]]:
    """The pids of the Serve processes of each role, found once by their titles (Linux)."""
    pids: dict[str, list[int]] = {role: [] for role in ROLES}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                title = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        for role, marker in ROLES.items():
            if title.startswith("ray::") and marker in title:
                pids[role].append(int(entry.name))
    return pids


def role_cpu_s(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds of each role's processes."""
    totals = dict.fromkeys(pids, 0.0)
    for role, members in pids.items():
        for pid in members:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended (a replica restarted): its CPU is lost to the figure
            totals[role] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return totals


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:vtp-small")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--endpoint", default="reconstruct", choices=sorted(VERBS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, nargs="+", default=None, help="per client count (default 16 / 4x)")
    parser.add_argument("--time-limit-s", type=float, default=180.0, help="per client count")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.0)
    parser.add_argument("--direct-runs", type=int, default=5, help="batch-1 calls per direct timing")
    parser.add_argument("--direct-batches", type=int, default=2, help="full-batch calls per direct timing")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs (torch threads) for the model")
    parser.add_argument("--photo", default="500x375", help="WxH of the JPEG the clients send (a typical photo)")
    parser.add_argument("--large-photo", default="4000x3000", help="WxH of the photo of the ingress-cost check")
    parser.add_argument("--large-requests", type=int, default=4, help="requests of the ingress-cost check")
    parser.add_argument(
        "--fast-preprocess", "--draft-decode", action="store_true", help="the app's preprocess.fast setting"
    )
    parser.add_argument(
        "--direct-ingress", action="store_true", help="also time the ingress replica's own port (no proxy)"
    )
    parser.add_argument("--idle-s", type=float, default=5.0, help="how long the idle Serve processes are measured")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = [max(16, 4 * c) for c in args.clients]
    if len(args.requests) != len(args.clients):
        parser.error("--requests needs one count per --clients value")
    return args


def sample_jpeg(shape: str) -> bytes:
    """A photo-like JPEG of ``WxH`` pixels (smooth gradients, a block, mild noise)."""
    w, h = map(int, shape.lower().split("x"))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin((x + y) / 23.0)], axis=-1) * 255
    image[h // 4 : h // 2, w // 3 : w // 2] = (200, 40, 40)
    image += np.random.default_rng(0).normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class DirectReplica:
    """``VTPReplica`` in a Ray actor like the Serve replica's, timed at batch 1 and at the full batch size inside
    the actor (wall clock, and this process's CPU seconds)."""

    def __init__(self, args: argparse.Namespace, data: bytes) -> None:
        brief_openmp_waits("cpu")  # as the Serve replica does, before torch loads
        from vtp_ray import VTPReplica

        replica = VTPReplica(
            args.model, device="cpu", precision=args.precision, warmup_size=args.image_size, cpu_threads=args.cpus
        )
        self.verb = getattr(replica, VERBS[args.endpoint])
        image = preprocess(data, size=args.image_size)
        self.one, self.full = image[None], np.stack([image] * args.max_batch_size)
        self.runs, self.batches = args.direct_runs, args.direct_batches
        self.verb(self.full)  # warm up the full batch shape too

    def measure(self) -> Direct:
        latencies = []
        cpu_started = process_cpu_s()
        for _ in range(self.runs):
            started = time.perf_counter()
            self.verb(self.one)
            latencies.append((time.perf_counter() - started) * 1000)
        cpu_b1 = (process_cpu_s() - cpu_started) / self.runs
        images = self.batches * len(self.full)
        started, cpu_started = time.perf_counter(), process_cpu_s()
        for _ in range(self.batches):
            self.verb(self.full)
        throughput = images / (time.perf_counter() - started)
        return Direct(statistics.median(latencies), throughput, cpu_b1, (process_cpu_s() - cpu_started) / images)


def process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def direct_timer(args: argparse.Namespace, data: bytes) -> Callable[[], Direct]:
    """Start ``DirectReplica``; the returned function times it."""
    actor = ray.remote(num_cpus=args.cpus)(DirectReplica).remote(args, data)
    return lambda: ray.get(actor.measure.remote())


def start_app(args: argparse.Namespace) -> str:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = AppSettings(
        model=args.model,
        precision=args.precision,
        placement={"num_cpus": args.cpus},  # same torch threads as the direct run (Ray sets OMP_NUM_THREADS)
        image_size=args.image_size,
        preprocess={"fast": args.fast_preprocess},
        rate_limits=NO_RATE_LIMITS,
    )
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    serve.run(compose_app(app_args, user_config=batching), name="vtp", route_prefix="/")
    return f"http://127.0.0.1:{port}"


async def run_level(
    url: str,
    endpoint: str,
    data: bytes,
    clients: int,
    requests: int,
    limit_s: float,
    query: str = "",
    pids: dict[str, list[int]] | None = None,
) -> Level:
    """``clients`` concurrent clients, each sending one request at a time, until ``requests`` are done."""
    level = Level(clients)
    remaining = requests
    deadline = time.perf_counter() + limit_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            started = time.perf_counter()
            response = await http.post(f"/v1/{endpoint}{query}", content=data, headers={"content-type": "image/jpeg"})
            if response.status_code != 200:
                level.failed += 1
                continue
            level.latencies_ms.append((time.perf_counter() - started) * 1000)
            level.batch_sizes.append(int(response.headers["x-vtp-batch-size"]))
            for entry in response.headers["server-timing"].split(","):
                name, _, duration = entry.strip().partition(";dur=")
                level.stages_ms.setdefault(name, []).append(float(duration))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=limit_s, limits=limits) as http:
        pids = pids or {}
        started, cpu_started, roles_started = time.perf_counter(), tree_cpu_s(), role_cpu_s(pids)
        await asyncio.gather(*(client(http) for _ in range(clients)))
        level.elapsed_s, level.cpu_s = time.perf_counter() - started, tree_cpu_s() - cpu_started
        level.role_cpu_s = {role: s - roles_started[role] for role, s in role_cpu_s(pids).items()}
    return level


def main() -> None:
    args = parse_args()
    data = sample_jpeg(args.photo)
    print(
        f"model {args.model}, {args.precision}, {args.image_size}px, /v1/{args.endpoint} vs "
        f"VTPReplica.{VERBS[args.endpoint]}, {args.cpus} CPU threads, max_batch_size {args.max_batch_size}, "
        f"batch_wait_timeout_s {args.batch_wait_timeout_s}"
    )
    openmp = {var: os.environ[var] for var in OPENMP_WAIT_VARS if var in os.environ} or "the replicas' default"
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), f"| OpenMP waits: {openmp}")
    direct_url = f"http://127.0.0.1:{enable_direct_ingress()}" if args.direct_ingress else None
    # Logical CPUs for both the Serve replica and the direct one: they take turns on the same cores.
    ray.init(address="local", num_cpus=2 * args.cpus + 1, include_dashboard=False, log_to_driver=False)
    measure_direct = direct_timer(args, data)
    url = start_app(args)
    paths = {"proxy": url, **({"direct": direct_url} if direct_url else {})}
    rows = []
    try:
        warmup = 2 * args.max_batch_size
        for path_url in paths.values():
            asyncio.run(run_level(path_url, args.endpoint, data, warmup, warmup, args.time_limit_s))
        pids = serve_pids()
        # What the Serve processes burn with no request at all (Ray's and Serve's background work), per second.
        idle_started = role_cpu_s(pids)
        time.sleep(args.idle_s)
        idle = {role: (s - idle_started[role]) * 1000 / args.idle_s for role, s in role_cpu_s(pids).items()}
        for clients, requests in zip(args.clients, args.requests, strict=True):
            for path, path_url in paths.items():
                before = measure_direct()
                level = asyncio.run(
                    run_level(path_url, args.endpoint, data, clients, requests, args.time_limit_s, "", pids)
                )
                after = measure_direct()
                rows.append((path, level, Direct.mean(before, after)))
        # What the ingress spends on each photo size, one client at a time: exact decoding and, where the
        # images module supports it, reduced-scale (draft) decoding.
        large = sample_jpeg(args.large_photo)
        costs = []
        for shape, photo in ((args.photo, data), (args.large_photo, large)):
            for mode in ("exact", "fast"):
                query = f"?preprocess={mode}"
                level = asyncio.run(
                    run_level(url, args.endpoint, photo, 1, args.large_requests, args.time_limit_s, query, pids)
                )
                costs.append((shape, len(photo), mode, level))
    finally:
        serve.shutdown()
        ray.shutdown()
    print("load average at end:   {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    b = args.max_batch_size
    print(f"\nHTTP /v1/{args.endpoint} (path: through Serve's proxy, or direct to the ingress replica's port)")
    print(
        f"{'path':>6} {'clients':>7} {'ok':>4} {'failed':>6} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>5} "
        f"{'cpu-s/img':>9} {'overhead p50 / p99 ms':>21}"
    )
    for path, level, _ in rows:
        mean_batch = statistics.fmean(level.batch_sizes) if level.batch_sizes else float("nan")
        print(
            f"{path:>6} {level.clients:>7} {len(level.latencies_ms):>4} {level.failed:>6} {level.throughput:>7.2f} "
            f"{level.percentile(50):>8.1f} {level.percentile(99):>8.1f} {mean_batch:>5.2f} "
            f"{level.cpu_s_per_image:>9.3f} {level.overhead_ms(50):>10.1f} / {level.overhead_ms(99):>6.1f}"
        )
    print(f"\ndirect VTPReplica.{VERBS[args.endpoint]} (mean of the timings right before and after each level)")
    print(
        f"{'path':>6} {'clients':>7} {'b1 p50 ms':>9} {f'b{b} img/s':>9} {'b1 cpu-s/img':>12} "
        f"{f'b{b} cpu-s/img':>12} | "
        f"{f'img/s / b{b}':>10} {'p50 - b1 ms':>11} {'cpu-s/img direct / HTTP':>23}"
    )
    for path, level, direct in rows:
        # The CPU comparison takes the direct batch size the HTTP level ran at: 1 for one client.
        direct_cpu = direct.cpu_s_per_image_b1 if level.clients == 1 else direct.cpu_s_per_image
        print(
            f"{path:>6} {level.clients:>7} {direct.p50_ms:>9.1f} {direct.images_per_s:>9.2f} "
            f"{direct.cpu_s_per_image_b1:>12.3f} "
            f"{direct.cpu_s_per_image:>12.3f} | {level.throughput / direct.images_per_s:>10.2f} "
            f"{level.percentile(50) - direct.p50_ms:>+11.1f} {direct_cpu / level.cpu_s_per_image:>23.2f}"
        )
    print(
        "goals: img/s / b8 >= 0.9 at 16 clients; p50 - b1 <= 20 ms at 1 client (also: the overhead p50 above, "
        "latency less the replica's own model time)"
    )

    print("\nCPU ms per second of the idle Serve processes: " + ", ".join(f"{r} {ms:.1f}" for r, ms in idle.items()))
    print(f"CPU ms per request by Serve process (/proc; idle CPU included), {args.photo} JPEG")
    print(f"{'path':>6} {'clients':>7} " + " ".join(f"{role:>8}" for role in ROLES))
    for path, level, _ in rows:
        n = len(level.latencies_ms)
        cpu_ms = " ".join(f"{level.role_cpu_s[r] * 1000 / n:>8.1f}" for r in ROLES)
        print(f"{path:>6} {level.clients:>7} {cpu_ms}")

    print("\ningress cost per photo size, 1 client (CPU ms per request; Server-Timing means in ms)")
    print(
        f"{'photo':>10} {'bytes':>8} {'mode':>6} {'p50 ms':>8} {'ingress':>8} {'proxy':>6} "
        f"{'read':>6} {'pre':>6} {'png':>6}"
    )
    for shape, size, mode, level in costs:
        n = len(level.latencies_ms)
        stage = {name: statistics.fmean(v) for name, v in level.stages_ms.items()}
        print(
            f"{shape:>10} {size:>8} {mode:>6} {level.percentile(50):>8.1f} "
            f"{level.role_cpu_s['ingress'] * 1000 / n:>8.1f} {level.role_cpu_s['proxy'] * 1000 / n:>6.1f} "
            f"{stage.get('read', 0):>6.1f} {stage.get('preprocess', 0):>6.1f} {stage.get('output', 0):>6.1f}"
        )

    stages = list(rows[0][1].stages_ms)
    print("\nwhere a request's time went, mean ms (Server-Timing; rest: HTTP, the proxy, Serve's hops)")
    print(f"{'path':>6} {'clients':>7} " + " ".join(f"{name:>8}" for name in [*stages, "rest"]))
    for path, level, _ in rows:
        means = [statistics.fmean(level.stages_ms[name]) for name in stages]
        rest = statistics.fmean(level.latencies_ms) - sum(means)
        print(f"{path:>6} {level.clients:>7} " + " ".join(f"{ms:>8.1f}" for ms in [*means, rest]))


if __name__ == "__main__":
    main()
