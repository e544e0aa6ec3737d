"""The vtp-ray command: its flags parsed in-process (fast), its user errors in-process (fast: they come before
anything loads), then run as a user runs it, a real subprocess on real files (slow)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

from vtp_ray.cli import build_parser, main
from vtp_ray.cli.args import pipeline_spec, replicas_arg, resources_arg
from vtp_ray.pipeline import PipelineSpec, Preprocessing
from vtp_ray.pipeline.runner import actor_options

slow = pytest.mark.slow


def vtp_ray(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vtp_ray.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_job_flags_become_one_pipeline_spec():
    args = build_parser().parse_args(
        ["tokenize", "in", "-o", "out", "--model", "m", "--size", "128", "--replicas", "2-4", "--resources",
         '{"NPU": 1}', "--batch-size", "16", "--crop", "resize", "--precision", "bf16", "--no-progress"]
    )  # fmt: skip
    spec = pipeline_spec(args)
    assert spec == PipelineSpec(
        "m", precision="bf16", preprocessing=Preprocessing(128, "resize"), batch_size=16, replicas=(2, 4),
        resources={"NPU": 1}, progress=False,
    )  # fmt: skip
    assert (args.func.__name__, args.output, args.flip, args.rows_per_file) == (
        "cmd_tokenize",
        "out",
        False,
        None,
    )  # 2048, or 10000 per shard
    assert pipeline_spec(build_parser().parse_args(["eval", "in", "-o", "o", "--model", "m"])) == PipelineSpec("m")
    # The replicas' torch threads: auto by default, as PipelineSpec's; or a number
    assert PipelineSpec("m").cpu_threads == "auto"
    for value, threads in ("3", 3), ("AUTO", "auto"):
        args = build_parser().parse_args(["tokenize", "in", "-o", "o", "--model", "m", "--cpu-threads", value])
        assert pipeline_spec(args).cpu_threads == threads
    # CUDA graphs on by default, as VTPReplica's; off when asked (every model command has the flag)
    assert PipelineSpec("m").cuda_graphs is True
    args = build_parser().parse_args(["tokenize", "in", "-o", "o", "--model", "m", "--cuda-graphs", "OFF"])
    assert pipeline_spec(args).cuda_graphs is False
    assert build_parser().parse_args(["verify", "--model", "m"]).cuda_graphs is True
    # An embedded local Ray starts without its dashboard unless asked (it adds 1-2 s to ray.init).
    assert PipelineSpec("m").dashboard is False
    assert pipeline_spec(build_parser().parse_args(["eval", "in", "-o", "o", "--model", "m", "--dashboard"])).dashboard


@pytest.mark.parametrize(
    "argv",
    [
        ["tokenize", "in", "-o", "out", "--model", "m", "--replicas", "two"],
        ["tokenize", "in", "-o", "out", "--model", "m", "--resources", "[1]"],
        ["tokenize", "in", "-o", "out", "--model", "m", "--cpu-threads", "0"],
        ["tokenize", "in", "-o", "out", "--model", "m", "--cpu-threads", "all"],
        ["bench", "--model", "m", "--cuda-graphs", "yes"],
        ["bench", "--model", "m", "--precisions", "fp32", "--precision", "int8"],
        ["reconstruct", "a.png", "--out", "o", "--model", "m", "--crop", "diagonal"],
    ],
)
def test_bad_flags_are_refused_by_the_parser(argv: list[str], capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_replicas_and_resources_flags_parse_into_actor_options():
    assert replicas_arg("3") == 3 and replicas_arg("1-4") == (1, 4)
    assert resources_arg("NPU") == "npu" and resources_arg('{"NPU": 1}') == {"NPU": 1}
    with pytest.raises(argparse.ArgumentTypeError):
        resources_arg("[1]")
    assert actor_options({"NPU": 1, "CPU": 2}) == {"num_cpus": 2, "resources": {"NPU": 1}}
    assert actor_options({"GPU": 1}) == {"num_gpus": 1}
    assert actor_options({"num_gpus": 1}) == {"num_gpus": 1}


@slow
def test_a_job_reports_a_bad_input_in_one_line_without_starting_ray_or_loading_torch(tmp_path):
    argv = ["tokenize", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--model", "random:vtp-small"]
    code = (
        f"import sys; from vtp_ray.cli import main; code = main({argv!r}); "
        "print(code, sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "[]"], result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vtp-ray tokenize: error:")
    assert "no such file or directory" in result.stderr and "Traceback" not in result.stderr


@slow
def test_info_reports_versions_and_devices():
    result = vtp_ray("info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["torch"] and info["ray"]
    assert "cpu" in info["devices"]["types"]


@slow
def test_info_without_a_cluster_at_the_address_says_so_in_one_line():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there ("auto" would find any Ray running here)
    result = vtp_ray("info", env={**os.environ, "RAY_ADDRESS": address})
    assert result.returncode == 2, result.stdout
    assert f"no Ray cluster found at '{address}'" in result.stderr and "Traceback" not in result.stderr


@slow
def test_reconstruct_writes_pngs_and_reports_bad_files(tiny_dir, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8), mode="L").save(tmp_path / "b.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = vtp_ray(
        "reconstruct", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "broken.jpg"),
        "--model", str(tiny_dir), "--size", "64", "--out", str(out), "--side-by-side", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 1  # one input failed
    assert "broken.jpg: skipped" in result.stderr and "not_an_image" not in result.stdout
    assert "2 reconstructed, 1 failed" in result.stdout
    assert "PSNR" in result.stdout
    for name in ("a.png", "b.png"):
        with Image.open(out / name) as im:
            assert im.size == (128, 64) and im.mode == "RGB"  # input | reconstruction


@slow
def test_verify_passes_and_fails_by_threshold(tiny_dir):
    ok = vtp_ray("verify", "--model", str(tiny_dir), "--size", "64", "--device", "cpu")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "reconstruction" in ok.stdout
    strict = vtp_ray(
        "verify", "--model", str(tiny_dir), "--size", "64", "--precision", "bf16", "--max-error", "1e-6"
    )  # fmt: skip
    assert strict.returncode == 1
    assert "FAIL" in strict.stdout


@slow
def test_bench_reports_every_verb_and_batch(tiny_dir):
    result = vtp_ray(
        "bench", "--model", str(tiny_dir), "--size", "64", "--batch-sizes", "1,2", "--warmup", "0", "--runs", "1",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)  # stdout holds the JSON alone: the progress goes to stderr
    assert {(r["batch"], r["verb"]) for r in rows} == {
        (b, v) for b in (1, 2) for v in ("encode", "decode", "reconstruct", "embed")
    }
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in rows)
    gemm = {r["gemm_gflops"] for r in rows}  # one GEMM rate per precision, the one the progress line names
    assert len(gemm) == 1 and gemm.pop() > 0
    assert all(
        r["of_gemm"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e9 / r["gemm_gflops"]) for r in rows
    )
    progress = [line for line in result.stderr.splitlines() if line.startswith("bench")]
    assert re.fullmatch(
        r"bench: 8 measurements: 1 precision x 2 batch sizes x 4 verbs x 1 call \(0 warm-up \+ 1 timed\) at 64 px "
        r"on \S+; time estimates follow the first measurement",
        progress[0],
    ), progress[0]
    assert re.fullmatch(r"bench: fp32 GEMM rate on \S+: [\d,]+ GFLOP/s", progress[1]), progress[1]
    assert progress[2] == "bench 1/8: fp32 eager batch 1 encode"
    # the whole estimate shows when the bench is long, which this tiny one is only on a busy machine
    steps = [line for line in progress[3:-1] if not line.startswith("bench: about ")]
    measurements = [(b, v) for b in (1, 2) for v in ("encode", "decode", "reconstruct", "embed")]
    expected = [f"bench {i}/8: fp32 eager batch {b} {v}" for i, (b, v) in enumerate(measurements[1:], 2)]
    assert [line.split(";")[0] for line in steps] == expected
    assert all(re.search(r"; \d+ s so far, (about \d+ (s|min)|under a second) left$", line) for line in steps)
    assert progress[-1].startswith("bench: 8 measurements in ")


# User errors found before anything loads: in-process (main's exit code and stderr are what the command has).


def test_bench_refuses_an_unknown_verb_before_loading_anything(tiny_dir, capsys):
    assert main(["bench", "--model", str(tiny_dir), "--verbs", "encode,fly"]) == 2
    assert "unknown verbs ['fly']: choose from encode, decode, reconstruct, embed" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "bench", "reconstruct"])
def test_a_missing_model_path_says_how_to_get_weights(tmp_path, command, capsys):
    extra = [str(tmp_path / "x.png"), "--out", str(tmp_path)] if command == "reconstruct" else []
    assert main([command, *extra, "--model", str(tmp_path / "VTP-Small-f16d64")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "random:vtp-small" in err and "Traceback" not in err
