"""Eager against compiled replicas (``VTPReplica(compile="on")``): speed, model FLOP rate, and start-up time.

For each precision this CPU multiplies natively (fp32 always; bf16 with AVX512-BF16 or AMX; fp16 with AMX-FP16),
``encode``, ``decode`` and ``reconstruct`` at each batch size, eager and compiled, in one run:

- ms per image (wall: the median of ``--runs`` calls) and CPU ms per image (user + system of this process: the
  figure that holds when other jobs share the cores), and the compiled speed-up;
- the model's FLOPs (``torch.utils.flop_counter.FlopCounterMode`` on the real, unpadded batch) over the wall time,
  against this machine's own GEMM rate in that precision (a 2048^3 matmul, measured in the same run);
- start-up: a fresh process builds the compiled replica with an empty cache and waits until its warm-up graphs
  (batch 1 and 2..max of ``--size`` images) are compiled (cold), then a second fresh process does the same with
  the filled cache (warm): seconds from the constructor to ``compile_ready``, and from the process start.

Wall-clock figures need a machine to themselves; the load average is printed at the start and the end.

    PYTHONPATH=. python benchmarks/compile_speed.py                        # random:vtp-small, batch 1 and 8
    PYTHONPATH=. python benchmarks/compile_speed.py --precisions fp32 --batches 8 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()

from vtp_ray.placement import brief_openmp_waits  # noqa: E402  (before torch: OpenMP reads it at load)

brief_openmp_waits("cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vtp_ray import VTPReplica  # noqa: E402
from vtp_ray.bench import gemm_flops_per_s  # noqa: E402
from vtp_ray.device import cpu_has_fast_low_precision, resolve_precision  # noqa: E402

VERBS = ("encode", "decode", "reconstruct")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16")


def cpu_name_and_flags() -> tuple[str, list[str]]:
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return name, [flag for flag in CPU_FLAGS if flag in flags]


def native_precisions() -> list[str]:
    found = ["fp32"]
    found += [p for p in ("bf16", "fp16") if cpu_has_fast_low_precision(resolve_precision(p))]
    return found


def gemm_gflops(dtype: torch.dtype) -> float:
    """This CPU's matmul rate in ``dtype`` (GFLOP/s): the best of five 2048^3 products."""
    return gemm_flops_per_s(torch.device("cpu"), dtype, n=2048) / 1e9


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_calls(fns: dict, runs: int) -> dict:
    """(median wall seconds, median CPU seconds) of each call over ``runs`` rounds after two warm-up calls; the
    calls take turns within each round, so that background load falls on all of them alike."""
    samples: dict = {key: ([], []) for key in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(runs):
        for key, fn in fns.items():
            wall, cpu = time.perf_counter(), _cpu_seconds()
            fn()
            samples[key][0].append(time.perf_counter() - wall)
            samples[key][1].append(_cpu_seconds() - cpu)
    return {key: (statistics.median(w), statistics.median(c)) for key, (w, c) in samples.items()}


def calls(replica: VTPReplica, images: np.ndarray, latents: np.ndarray) -> dict:
    return {
        "encode": lambda: replica.encode(images),
        "decode": lambda: replica.decode(latents),
        "reconstruct": lambda: replica.reconstruct(images),
    }


def count_flops(replica: VTPReplica, images: np.ndarray, latents: np.ndarray) -> dict[str, float]:
    """FLOPs of each verb on this (unpadded) batch, counted on the eager replica."""
    flops = {}
    for verb, call in calls(replica, images, latents).items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[verb] = float(counter.get_total_flops())
    return flops


def start_up(args: argparse.Namespace, precision: str, cache: str) -> dict:
    """A fresh process that builds the compiled replica and waits for its warm-up graphs (the ``--probe`` mode)."""
    command = [sys.executable, __file__, "--probe", "--model", args.model, "--precision", precision]
    command += ["--size", str(args.size), "--max-batch", str(max(args.batches)), "--cache", cache]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if out.returncode:
        raise RuntimeError(f"start-up probe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(args: argparse.Namespace) -> None:
    built = time.perf_counter()
    replica = VTPReplica(
        args.model,
        device="cpu",
        precision=args.precision,
        warmup_size=args.size,
        compile="on",
        compile_cache=args.cache,
        compile_max_batch=args.max_batch,
    )
    replica.wait_compiled()
    now = time.perf_counter()
    status = replica.compile_status()
    print(
        json.dumps(
            {
                "ready_s": now - built,
                "process_s": now - STARTED,
                "compile_s": status.compile_seconds,
                "graphs": len(status.graphs),
                "failed": status.failed,
                "cache_hits": status.cache_hits,
                "cache_misses": status.cache_misses,
            }
        )
    )


def run(args: argparse.Namespace) -> None:
    name, flags = cpu_name_and_flags()
    precisions = args.precisions or native_precisions()
    print(f"{name}, {os.cpu_count()} CPUs, flags {' '.join(flags) or '-'}; torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"model {args.model}, {args.size} px, batches {args.batches}, precisions {precisions}\n")
    rows, starts = [], {}
    for precision in precisions:
        dtype = resolve_precision(precision)
        gemm_before = gemm_gflops(dtype)
        cache = args.cache or tempfile.mkdtemp(prefix="vtp-compile-cache-")
        first = "cold" if not args.cache else "first (given cache)"
        starts[precision] = {first: start_up(args, precision, cache), "warm": start_up(args, precision, cache)}
        eager = VTPReplica(args.model, device="cpu", precision=precision, warmup_size=0)
        compiled = VTPReplica(
            args.model,
            device="cpu",
            precision=precision,
            warmup_size=args.size,
            compile="on",
            compile_cache=cache,
            compile_max_batch=max(args.batches),
        )
        compiled.wait_compiled()
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            images = rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
            latents = eager.encode(images).latents
            flops = count_flops(eager, images, latents)
            fns = {
                (mode, verb): call
                for verb in VERBS
                for mode, replica in (("eager", eager), ("compiled", compiled))
                for name, call in calls(replica, images, latents).items()
                if name == verb
            }
            timed = time_calls(fns, args.runs)
            for verb in VERBS:
                (e_wall, e_cpu), (c_wall, c_cpu) = timed["eager", verb], timed["compiled", verb]
                rows.append(
                    {
                        "precision": precision,
                        "verb": verb,
                        "batch": batch,
                        "eager_ms": e_wall * 1e3 / batch,
                        "compiled_ms": c_wall * 1e3 / batch,
                        "speedup": e_wall / c_wall,
                        "eager_cpu_ms": e_cpu * 1e3 / batch,
                        "compiled_cpu_ms": c_cpu * 1e3 / batch,
                        "cpu_speedup": e_cpu / c_cpu,
                        "gflop_per_image": flops[verb] / batch / 1e9,
                    }
                )
        # The machine's rate: the better of two measurements, before and after (a busy moment only lowers it).
        gemm = max(gemm_before, gemm_gflops(dtype))
        for row in rows:
            if row["precision"] == precision:
                # model GFLOP/s over the GEMM rate: GFLOP per image / seconds per image / GFLOP/s
                row["gemm_gflops"] = gemm
                row["eager_gemm_share"] = row["gflop_per_image"] / (row["eager_ms"] / 1e3) / gemm
                row["compiled_gemm_share"] = row["gflop_per_image"] / (row["compiled_ms"] / 1e3) / gemm
        status = compiled.compile_status()
        if status.eager_calls or status.failed:
            print(f"note: {precision} compiled replica ran eagerly at times: {status.eager_calls} {status.failed}")
        del eager, compiled
    if args.json:
        print(json.dumps({"rows": rows, "start_up": starts}))
        return
    print(
        f"{'precision':<10}{'verb':<12}{'batch':>5}{'eager ms':>10}{'compiled':>10}{'speedup':>8}"
        f"{'eager cpu':>11}{'compiled':>10}{'speedup':>8}{'GFLOP/img':>10}{'eager %GEMM':>12}{'compiled':>9}"
    )
    for r in rows:
        print(
            f"{r['precision']:<10}{r['verb']:<12}{r['batch']:>5}{r['eager_ms']:>10.1f}{r['compiled_ms']:>10.1f}"
            f"{r['speedup']:>7.2f}x{r['eager_cpu_ms']:>11.1f}{r['compiled_cpu_ms']:>10.1f}{r['cpu_speedup']:>7.2f}x"
            f"{r['gflop_per_image']:>10.2f}{r['eager_gemm_share']:>11.0%}{r['compiled_gemm_share']:>10.0%}"
        )
    print("(ms and CPU ms per image; %GEMM: model FLOPs / wall time against this machine's GEMM rate)")
    for precision, rate in {r["precision"]: r["gemm_gflops"] for r in rows}.items():
        print(f"GEMM rate {precision}: {rate:.0f} GFLOP/s")
    for precision, start in starts.items():
        for kind, s in start.items():
            print(
                f"start-up {precision} {kind}: ready {s['ready_s']:.1f} s after the constructor "
                f"({s['process_s']:.1f} s after the process start), {s['graphs']} graphs, compiling "
                f"{s['compile_s']:.1f} s, cache hits {s['cache_hits']} misses {s['cache_misses']}"
                + (f", failed {s['failed']}" if s["failed"] else "")
            )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:vtp-small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    p.add_argument("--precisions", type=lambda s: s.split(","), help="default: those this CPU runs natively")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cache", help="compile cache directory (default: a fresh one, so the first start is cold)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    probe(args) if args.probe else run(args)


if __name__ == "__main__":
    main()
