"""The README's examples, run as written (fast: every command parses and every file it names exists; slow: the
examples that need no model hub and no accelerator run against the tiny fixture), so the README cannot drift.

The slow runs rewrite only what a newcomer's machine would differ in: model paths become the tiny checkpoint,
``/data/...`` trees become generated images in a temporary directory, ``localhost:8000`` becomes the test's Serve
port; Ray jobs join the session's shared Ray (``RAY_ADDRESS``). Commands that need weights from a hub, an NPU or
a cluster (``modelscope``, ``hf``, ``--device npu:0``, ``HEAD``, ``--address auto``) are listed and skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers import ROOT, SIZE, TINY, TINYTEXT, random_image
from PIL import Image

from vtp_ray.cli import build_parser

if TYPE_CHECKING:
    from serving import ServeInstance

README = (ROOT / "README.md").read_text()
NEEDS_MORE = ("modelscope ", "hf download", "npu:0", "HEAD", "--address auto", "pip install", "python -m pytest")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def _commands() -> list[str]:
    """Each shell command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = _commands()


def test_the_readme_has_examples_to_check() -> None:
    assert sum(c.startswith("vtp-ray ") for c in COMMANDS) >= 10 and sum(c.startswith("curl ") for c in COMMANDS) >= 8


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("vtp-ray ")])
def test_every_vtp_ray_command_parses(command: str) -> None:
    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_every_file_the_readme_names_exists() -> None:
    named = set(
        re.findall(r"\b((?:examples|benchmarks|deployments|vtp_ray|tests)/[\w./-]+\.(?:py|sh|yaml|md))", README)
    )
    named |= {"serve_config.yaml", "ARCHITECTURE.md"}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_nothing_in_the_repository_points_outside_it() -> None:
    outside = "../" + "shared"  # spelled apart, so that this file does not name it
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    text_files = [p for p in tracked if p.endswith((".py", ".md", ".yaml", ".sh", ".toml", ".txt", ".cfg"))]
    offenders = [p for p in text_files if (ROOT / p).is_file() and outside in (ROOT / p).read_text()]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------------ runs


def _substitute(command: str, sandbox: Path) -> str:
    for model in ("random:vtp-small", "./VTP-Small-f16d64", "/models/VTP-Small-f16d64", "/models/vtp-small"):
        command = command.replace(model, TINY)
    for tree in ("/data/imagenet/train", "/data/imagenet/val", "/data/val", "./photos"):
        command = command.replace(tree, str(sandbox / "images"))
    return command.replace("/data/latents/in1k-256", str(sandbox / "latents")).replace("/tmp/latents", "latents")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the files the examples name: photo.jpg, cat.jpg, a.jpg, b.png, a class tree."""
    root = tmp_path_factory.mktemp("readme")
    for name, seed in (("photo.jpg", 1), ("cat.jpg", 2), ("a.jpg", 3), ("b.png", 4)):
        Image.fromarray(random_image(90, 120, seed)).save(root / name)
    for i in range(6):
        (root / "images" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(70, 80, 10 + i)).save(root / "images" / f"class{i % 2}" / f"{i}.jpg")
    return root


def _run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_model_commands_run_as_written(sandbox: Path) -> None:
    ran = []
    for command in COMMANDS:
        head = command.split()[1] if command.startswith("vtp-ray ") else None
        if head not in ("info", "reconstruct", "verify", "bench") or any(s in command for s in NEEDS_MORE):
            continue
        result = _run(_substitute(command, sandbox), sandbox, dict(os.environ))
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        ran.append(head)
    assert {"info", "reconstruct", "verify", "bench"} <= set(ran), ran
    assert (sandbox / "recon" / "photo.png").is_file()


@pytest.mark.slow
def test_the_python_api_example_runs(sandbox: Path) -> None:
    (code,) = [block for block in _blocks("python") if "VTPModel.from_pretrained(" in block]
    result = _run(f"python - <<'EOF'\n{_substitute(code, sandbox)}\nEOF", sandbox, dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_the_dataset_commands_run_as_written(sandbox: Path, ray_runtime: str) -> None:
    # The ImageNet-style tokenize with the embedded Ray a newcomer gets (its placement is auto, and the shared test
    # runtime declares NPUs); the eval, which asks for CPU replicas, joins the shared runtime; then the comparison.
    (tokenize,) = [c for c in COMMANDS if c.startswith("vtp-ray tokenize /data/imagenet/train --labels-from-dirs")]
    (evaluate,) = [c for c in COMMANDS if c.startswith("vtp-ray eval /data/val --output runs/cpu-fp32")]
    (compare,) = [c for c in COMMANDS if c.startswith("vtp-ray eval --compare runs/cpu-fp32")]
    embedded = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for command, env in (
        (tokenize, embedded),
        (evaluate, {**embedded, "RAY_ADDRESS": ray_runtime}),
        (compare, embedded),
    ):
        if command == compare:
            # The README compares an NPU run with a CPU run; here both come from the CPU run.
            shutil.copytree(sandbox / "runs" / "cpu-fp32", sandbox / "runs" / "npu-bf16", dirs_exist_ok=True)
        result = _run(_substitute(command, sandbox), sandbox, env)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert json.loads((sandbox / "latents" / "stats.json").read_text())["rows"] == 6
    assert "PSNR B - A" in result.stdout


@pytest.fixture(scope="module")
def serve_port(serve_instance: ServeInstance) -> int:
    """The HTTP port of the README's app (the shared Serve; its gRPC proxy: ``serve_instance.grpc_port``)."""
    from serving import deploy

    from deployments import AppSettings, compose_app

    # The tiny checkpoint with CLIP's real vocabulary, so that the text examples run too.
    deploy(compose_app(AppSettings(model=TINYTEXT, placement="cpu", image_size=SIZE)), "vtp", "/")
    return serve_instance.http_port


@pytest.mark.slow
def test_the_curl_examples_run_as_written(sandbox: Path, serve_port: int) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (the README's examples use it): apt-get install curl")
    # The curl lines, and the python -c lines that write their request bodies, in README order.
    curls = [c for c in COMMANDS if c.startswith(("curl ", "python -c ")) and "HEAD" not in c]
    for command in curls:
        command = command.replace("localhost:8000", f"127.0.0.1:{serve_port}")
        command = command.replace("curl ", "curl --fail-with-body ", 1)
        result = _run(f"set -o pipefail; {command}", sandbox, {**os.environ, "VTP_API_KEY": "unused"})
        assert result.returncode == 0, f"{command}\n{result.stdout[-1000:]}\n{result.stderr[-1000:]}"
    assert Image.open(sandbox / "recon512.png").size == (512, 512)
    assert np.load(sandbox / "cat.npy").shape == (8, SIZE // 16, SIZE // 16)
    for name in ("recon.png", "decoded.png"):
        assert Image.open(sandbox / name).size == (SIZE, SIZE)
    assert json.loads((sandbox / "cat.json").read_text())["shape"] == [8, SIZE // 16, SIZE // 16]


def _run_python_example(marker: str, address: str, local: str, sandbox: Path) -> list[str]:
    """Runs the README's python block that contains ``marker``, with ``address`` pointed at ``local``; its lines."""
    (code,) = [block for block in _blocks("python") if marker in block]
    result = _run(f"python - <<'EOF'\n{code.replace(address, local)}\nEOF", sandbox, dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


@pytest.mark.slow
def test_the_kserve_client_example_runs(sandbox: Path, serve_port: int) -> None:
    lines = _run_python_example(
        "InferenceRESTClient", "http://localhost:8000", f"http://127.0.0.1:{serve_port}", sandbox
    )
    ready, latents, embedding = lines
    assert ready == "True True"
    assert latents.startswith("(1, ") and latents.endswith(f", {SIZE // 16}, {SIZE // 16})")  # image_size of the app
    assert embedding.startswith("(2, ")


@pytest.mark.slow
def test_the_grpc_example_runs(sandbox: Path, serve_port: int, serve_instance: ServeInstance) -> None:
    ready, latents, image = _run_python_example(
        "tritonclient.grpc", "localhost:8001", serve_instance.grpc_target, sandbox
    )
    assert ready == "True True"
    assert latents.startswith("(1, ") and latents.endswith(", 32, 32)")  # size 512 / 16
    assert image == "(1, 512, 512, 3)"
