"""What ``vtp-ray tokenize`` costs around the model, against plain loops on the same cores, in one run.

The tiny fixture model at 64 px costs almost nothing, so what is left is the pipeline: Ray Data tasks and actor
calls, Arrow <-> numpy copies, the driver's iteration and part writing. Over ``--images`` generated JPEGs
(72-128 px, 10 class folders) it measures, side by side:

- loop: one process, one thread, ``preprocess`` + ``VTPReplica.encode`` in batches of 32, times the cores (the
  rate two plain loops would reach); decode alone and the model alone, per image;
- tokenize: the ``vtp-ray tokenize`` CLI end to end (start-up included) with default settings, as a user runs it,
  and the driver's peak RSS (VmHWM) at ``--rss-at`` inputs and at all of them;
- overhead: core-ms per image outside decode and model = cores x wall / images - decode - model.

- marginal and fixed: from the two runs of different sizes (``--rss-at`` and ``--images``), the rate once running
  (their difference cancels the start-up) and the fixed cost (start + stop, what the first run has beyond its
  images at that rate). A run's start swings by seconds on a small machine, so each size runs ``--repeats`` times
  (alternating) and the medians count;
- warm: the larger run's own rate from its first output on (``stats.json``'s ``warm_images_per_s``), a second view
  of the rate once running that no start-up touches;
- against: with ``--against-args``, the same runs with other flags, alternating with these, and the ratio of
  their marginal and warm rates (e.g. ``--against-args "--cpu-threads 2"``: the job's replica on every core);
- Ray's floor: a Python process that imports Ray, starts a local Ray as the CLI does (no dashboard), imports torch
  and stops, measured in the same run: what any standalone job pays before its own start-up.

Goals (issue 24): marginal >= 0.8 x the loops, fixed <= 6 s::

    PYTHONPATH=. python benchmarks/pipeline_overhead.py --images 40000 --rss-at 20000
    PYTHONPATH=. python benchmarks/pipeline_overhead.py --images 20000 --rss-at 10000 --against-args "--cpu-threads 2"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import write_images

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "fixtures" / "vtp-tiny")
SIZE = 64
GOAL = 0.8  # marginal rate, of the loops
FIXED_GOAL_S = 6.0


def loop_rates(paths: list[Path], batch_size: int) -> dict[str, float]:
    """One thread: ms per image for decode + crop, for the model, and images/s for both in a plain loop."""
    import torch

    from vtp_ray import VTPReplica
    from vtp_ray.images import preprocess

    torch.set_num_threads(1)
    replica = VTPReplica(TINY, "cpu", "fp32", cpu_threads=1, warmup_size=SIZE)
    started = time.perf_counter()
    images = [preprocess(p, SIZE) for p in paths]
    decode_s = time.perf_counter() - started
    batches = [np.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    replica.encode(batches[0])
    started = time.perf_counter()
    for batch in batches:
        replica.encode(batch)
    model_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        replica.encode(np.stack([preprocess(p, SIZE) for p in paths[i : i + batch_size]]))
    loop_s = time.perf_counter() - started
    n = len(paths)
    return {"decode_ms": 1e3 * decode_s / n, "model_ms": 1e3 * model_s / n, "loop_per_s": n / loop_s}


def run_tokenize(inputs: list[str], output: Path, extra: list[str], code: Path = ROOT) -> tuple[float, float, float]:
    """The CLI of the tree ``code`` end to end into a fresh ``output``: ``(wall seconds, driver peak RSS in MB, the
    run's images/s from its first output on)`` (the driver's VmHWM; ``stats.json``'s ``warm_images_per_s``)."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "vtp_ray.cli", "tokenize", *inputs, "-o", str(output), "--model", TINY]
    command += ["--size", str(SIZE), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(code)}
    peak = [0.0]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def watch() -> None:
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = process.communicate()
    seconds = time.perf_counter() - started
    watcher.join()
    if process.returncode:
        raise SystemExit(f"tokenize failed ({process.returncode}):\n{out}")
    print("   ", out.strip().splitlines()[-1])
    warm = json.loads((output / "stats.json").read_text())["last_run"].get("warm_images_per_s", float("nan"))
    return seconds, peak[0], warm


#: What every standalone job pays whatever it does: the CLI's own ``ray_session`` start and stop, and torch.
FLOOR = (
    "import logging, ray, torch\n"
    "ray.init(address='local', include_dashboard=False, logging_level=logging.WARNING)\n"
    "ray.shutdown()\n"
)


def ray_floor(runs: int = 2) -> float:
    """Seconds of the fastest of ``runs`` processes that start and stop a local Ray (``FLOOR``)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


@dataclass
class Runs:
    """One configuration's runs: wall seconds, driver peak RSS and warm rates, by input count."""

    name: str
    extra: list[str]
    code: Path = ROOT
    walls: dict[int, list[float]] = field(default_factory=dict)
    rss: dict[int, list[float]] = field(default_factory=dict)
    warm: dict[int, list[float]] = field(default_factory=dict)

    def run(self, inputs: Path, count: int, output: Path) -> None:
        seconds, rss, warm = run_tokenize([str(inputs)], output, self.extra, self.code)
        self.walls.setdefault(count, []).append(seconds)
        self.rss.setdefault(count, []).append(rss)
        self.warm.setdefault(count, []).append(warm)
        print(f"{self.name:9}: {count} inputs in {seconds:.1f}s, driver peak RSS {rss:.0f} MB, warm {warm:.0f}/s")

    def marginal(self, small: int, large: int) -> tuple[float, float]:
        """``(images/s once running, fixed seconds)`` from the median walls of the two sizes."""
        small_s, large_s = statistics.median(self.walls[small]), statistics.median(self.walls[large])
        rate = (large - small) / (large_s - small_s)
        return rate, large_s - large / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rss-at", type=int, default=5_000, help="also run on this many inputs for the driver RSS")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each size (alternating); medians count")
    parser.add_argument("--loop-images", type=int, default=2_000, help="images timed in the single-thread loop")
    parser.add_argument("--batch-size", type=int, default=32, help="the loop's batch")
    parser.add_argument("--data", type=Path, help="reuse (or create) the JPEGs here instead of a temporary directory")
    parser.add_argument("--tokenize-args", default="", help="extra tokenize flags, e.g. '--batch-size 256'")
    parser.add_argument("--against-args", help="also run with these tokenize flags instead, alternating")
    parser.add_argument(
        "--baseline", type=Path, help="another source tree (e.g. `git worktree add /tmp/base main`) run the same way"
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="vtp-overhead-") as tmp:
        data = args.data or Path(tmp) / "images"
        paths = sorted(data.glob("class_*/*.jpg")) if data.exists() else []
        if len(paths) < args.images:
            started = time.perf_counter()
            paths = write_images(data, args.images, sides=(72, 128), blur=8)
            print(f"{len(paths)} JPEGs written in {time.perf_counter() - started:.1f}s")
        paths = paths[: args.images]
        subset = Path(tmp) / "subset.txt"
        subset.write_text("".join(f"{p}\n" for p in paths[: args.rss_at]))
        everything = Path(tmp) / "all.txt"
        everything.write_text("".join(f"{p}\n" for p in paths))

        # The loop before and after the pipelines: this machine's speed drifts (shared CPUs).
        before = loop_rates(paths[: args.loop_images], args.batch_size)
        extra = args.tokenize_args.split()
        configs = [Runs("tokenize", extra)]
        if args.against_args is not None:
            configs.append(Runs("against", args.against_args.split()))
        if args.baseline:
            configs.append(Runs("baseline", extra, args.baseline))
        small, large = args.rss_at, len(paths)
        for repeat in range(args.repeats):
            for runs in configs if repeat % 2 == 0 else configs[::-1]:
                runs.run(subset, small, Path(tmp) / "out-small")
                runs.run(everything, large, Path(tmp) / "out")
        floor = ray_floor()
        after = loop_rates(paths[: args.loop_images], args.batch_size)
        loop = {k: (before[k] + after[k]) / 2 for k in before}
        loops = cores * loop["loop_per_s"]
        print(
            f"loop     : {loop['loop_per_s']:8.0f} images/s on one thread ({before['loop_per_s']:.0f} before, "
            f"{after['loop_per_s']:.0f} after; decode {loop['decode_ms']:.3f} ms + model {loop['model_ms']:.3f} ms "
            f"per image); x {cores} cores = {loops:.0f}"
        )
        print(f"(medians of {args.repeats} runs of each size)")
        rates = {}
        for runs in configs:
            wall = statistics.median(runs.walls[large])
            overhead = 1e3 * cores * wall / large - loop["decode_ms"] - loop["model_ms"]
            marginal, fixed = runs.marginal(small, large)
            warm = statistics.median(runs.warm[large])
            rates[runs.name] = marginal, warm
            print(
                f"{runs.name:9}: {runs.extra or 'default flags'}: {large / wall:6.0f} images/s end to end "
                f"({overhead:.2f} core-ms per image outside decode and model), driver peak RSS "
                f"{max(runs.rss[small]):.0f} / {max(runs.rss[large]):.0f} MB"
            )
            print(
                f"  marginal {marginal:6.0f} images/s once running = {marginal / loops:.3f} of the loops (goal >= "
                f"{GOAL}); warm {warm:6.0f} images/s = {warm / loops:.3f}; fixed start + stop {fixed:.1f} s (goal <= "
                f"{FIXED_GOAL_S:g}), {fixed - floor:.1f} s beyond Ray's floor"
            )
        for name in rates.keys() - {"tokenize"}:
            print(
                f"tokenize / {name}: marginal {rates['tokenize'][0] / rates[name][0]:.2f}x, "
                f"warm {rates['tokenize'][1] / rates[name][1]:.2f}x"
            )
        print(f"floor    : {floor:6.1f} s for a process that only starts and stops a local Ray and imports torch")
        print(f"(flags {extra or 'default'}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
