"""``vtp-ray bench``'s progress: the plan, its estimate from the first measurement and the verbs' FLOPs, refreshed
per measurement (a clock of the test's own; the command itself runs in ``test_cli``)."""

from __future__ import annotations

from vtp_ray.bench import BenchProgress, duration


def test_durations_read_the_way_people_say_them():
    assert [duration(s) for s in (0.4, 40, 89, 90, 420, 3900)] == ["0 s", "40 s", "89 s", "2 min", "7 min", "1 h 5 min"]


def test_the_estimate_follows_the_flops_left_at_each_precisions_own_speed():
    lines: list[str] = []
    now = [0.0]
    tracker = BenchProgress(
        lines.append, ["fp32", "bf16"], ["eager"], [1, 8], ["encode", "reconstruct"], warmup=1, runs=3,
        clock=lambda: now[0],
    )  # fmt: skip
    tracker.plan({"encode": 1e9, "decode": 3e9}, "cpu", 256)
    assert lines == [
        "bench: 8 measurements: 2 precisions x 2 batch sizes x 2 verbs x 4 calls (1 warm-up + 3 timed) at 256 px on "
        "cpu; time estimates follow the first measurement"
    ]
    keys = [(p, "eager", b, v) for p in ("fp32", "bf16") for b in (1, 8) for v in ("encode", "reconstruct")]
    # 4 calls x GFLOP: 4, 16 at batch 1 and 32, 128 at batch 8, 180 per precision; fp32 at 0.5 s per GFLOP
    for key, gflop in zip(keys[:4], (4, 16, 32, 128), strict=True):
        tracker.start(key)
        now[0] += gflop * 0.5
        tracker.done(key)
    assert lines[1] == "bench 1/8: fp32 eager batch 1 encode"  # nothing timed yet: no estimate
    assert lines[2] == (
        "bench: about 3 min in all (the first measurement, 4 calls, took 2.0 s); quicker: fewer --batch-sizes, "
        "--precisions or --verbs, or smaller --warmup, --runs or --size"
    )  # 180 s for fp32, and bf16 taken to be as fast
    assert lines[3] == "bench 2/8: fp32 eager batch 1 reconstruct; 2 s so far, about 3 min left"
    assert lines[5] == "bench 4/8: fp32 eager batch 8 reconstruct; 26 s so far, about 3 min left"  # 64 s + 90 s
    tracker.start(keys[4])
    assert lines[-1] == "bench 5/8: bf16 eager batch 1 encode; 2 min so far, about 2 min left"
    now[0] += 4 * 4.0  # bf16 turns out 8x slower: its own speed from now on
    tracker.done(keys[4])
    tracker.start(keys[5])
    assert lines[-1] == "bench 6/8: bf16 eager batch 1 reconstruct; 2 min so far, about 12 min left"  # 176 GFLOP x 4 s
    tracker.finish()
    assert lines[-1] == "bench: 6 measurements in 2 min"


def test_a_mode_that_will_not_run_leaves_the_count_and_the_estimate():
    lines: list[str] = []
    now = [0.0]
    tracker = BenchProgress(
        lines.append, ["fp32"], ["eager", "compiled"], [2], ["decode", "embed"], warmup=0, runs=1,
        clock=lambda: now[0],
    )  # fmt: skip
    tracker.plan({"encode": 1e9, "decode": 1e9}, "cuda:0", 64)
    assert lines[0].startswith(
        "bench: 4 measurements: 1 precision x 2 modes (eager, compiled) x 1 batch size x 2 verbs"
    )
    tracker.start(("fp32", "eager", 2, "decode"))
    now[0] += 5.0
    tracker.done(("fp32", "eager", 2, "decode"))
    assert lines[-1] == "bench: about 20 s in all (the first measurement, 1 call, took 5.0 s)"  # compiled: as eager
    tracker.skip("fp32", "compiled")
    tracker.start(("fp32", "eager", 2, "embed"))
    assert lines[-1] == "bench 2/2: fp32 eager batch 2 embed; 5 s so far, about 5 s left"


def test_a_short_bench_gives_no_estimate_of_the_whole_and_no_zero_seconds():
    lines: list[str] = []
    now = [0.0]
    tracker = BenchProgress(lines.append, ["fp32"], ["eager"], [1], ["encode", "decode"], 0, 1, clock=lambda: now[0])
    tracker.plan({"encode": 1e9, "decode": 1e9}, "cpu", 64)
    tracker.start(("fp32", "eager", 1, "encode"))
    now[0] += 0.2
    tracker.done(("fp32", "eager", 1, "encode"))
    tracker.start(("fp32", "eager", 1, "decode"))
    assert lines[1:] == [
        "bench 1/2: fp32 eager batch 1 encode",
        "bench 2/2: fp32 eager batch 1 decode; 0 s so far, under a second left",
    ]
