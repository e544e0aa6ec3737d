"""``vtp-ray bench``'s progress: the plan's estimate from the first call's speed and the verbs' FLOPs, refreshed per
measurement (a clock of the test's own; the command itself runs in ``test_cli``)."""

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
    # 0.5 s per GFLOP. Per precision: 4 calls x (1 + 4 GFLOP at batch 1, 8 + 32 at batch 8) = 180 GFLOP = 90 s
    tracker.first_call(("fp32", "eager"), 1, 0.5)
    assert lines == [
        "bench: about 3 min: 2 precisions x 2 batch sizes x 2 verbs x 4 calls (1 warm-up + 3 timed) at 256 px on cpu "
        "(from a first encode of batch 1: 0.50 s); fewer --batch-sizes, --precisions or --verbs, or smaller --warmup, "
        "--runs or --size are quicker"
    ]
    keys = [(p, "eager", b, v) for p in ("fp32", "bf16") for b in (1, 8) for v in ("encode", "reconstruct")]
    for key, gflop in zip(keys[:4], (4, 16, 32, 128), strict=True):
        tracker.start(key)
        now[0] += gflop * 0.5  # fp32 keeps its speed
        tracker.done(key)
    assert lines[1] == "bench 1/8: fp32 eager batch 1 encode; 0 s so far, about 3 min left"
    assert lines[4] == "bench 4/8: fp32 eager batch 8 reconstruct; 26 s so far, about 3 min left"  # 64 s + bf16's 90
    tracker.first_call(("bf16", "eager"), 1, 4.0)  # bf16 turns out 8x slower: its own speed from now on
    tracker.start(keys[4])
    assert lines[-1] == "bench 5/8: bf16 eager batch 1 encode; 2 min so far, about 12 min left"  # 180 GFLOP x 4 s


def test_a_mode_that_will_not_run_leaves_the_count_and_the_estimate():
    lines: list[str] = []
    tracker = BenchProgress(
        lines.append, ["fp32"], ["eager", "compiled"], [2], ["decode"], warmup=0, runs=1, clock=lambda: 0.0
    )
    tracker.plan({"encode": 1e9, "decode": 1e9}, "cuda:0", 64)
    tracker.first_call(("fp32", "eager"), 2, 1.0)
    assert lines[0].startswith("bench: about 2 s: 1 precision x 2 modes (eager, compiled) x 1 batch size x 1 verb")
    tracker.skip("fp32", "compiled")
    tracker.start(("fp32", "eager", 2, "decode"))
    assert lines[-1] == "bench 1/1: fp32 eager batch 2 decode; 0 s so far, about 1 s left"
