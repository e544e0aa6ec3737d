"""The examples of README.md and of every page of docs/, run as written, so the documentation cannot drift.

Fast: every ``vtp-ray`` command parses, every repository file a page names exists, nothing points outside the
repository, every ``bash`` / ``python`` block that cannot run in CI carries a ``<!-- skip: <reason> -->`` marker on
the line before it (one skipped test per marked block, so ``pytest -rs`` lists them with their reasons), and the
serving page's error table matches the statuses the code answers with.

Slow: every other ``bash`` and ``python`` block runs. What a newcomer's machine would differ in is rewritten, and
only that: model names become the tiny test checkpoint (``--size 64`` where a command takes a size and gives none),
``/data/...`` trees generated images, ``localhost:8000`` / ``:8001`` the test's Serve app. Jobs join the session's
shared Ray, which declares NPUs, so a job that does not choose ``--resources`` gets ``--resources cpu``. The blocks
run in three groups at once (one-process commands and Python, Ray jobs, the Serve app's clients), each block in a
fresh ``bash -e`` (or one Python interpreter per page), and a failure names the page and line of its block.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from helpers import ROOT, SIZE, TINYTEXT, UNLIMITED, random_image, write_parquet
from PIL import Image

from vtp_ray.cli import build_parser

if TYPE_CHECKING:
    from serving import ServeInstance

PAGES = ("README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
EXAMPLES = ("bash", "python")  # the fence languages that are run; text, yaml, dockerfile are shown
MARKER = re.compile(r"<!-- skip: (?P<reason>\S.*?) -->")

#: What keeps a block from running in CI: (what it contains, why). A block holding one of these needs a marker.
CANNOT_RUN = (
    ("pip install", "installs packages"),
    ("python -m pytest", "runs the test suite"),
    ("modelscope ", "downloads from a model hub"),
    ("hf download", "downloads from a model hub"),
    ("npu:0", "needs an Ascend NPU"),
    ("HEAD", "names a cluster's head node"),
    ("--address auto", "joins a Ray cluster"),
    ("serve run", "starts a foreground server"),
    ("serve deploy", "deploys to a cluster"),
    ("start_node.sh", "starts a Ray node"),
    ("kubectl ", "needs Kubernetes"),
    ("docker ", "builds a container image"),
    ("s3://", "needs an S3 bucket"),
    ("benchmarks/", "a benchmark: minutes on a quiet machine"),
    ("--task linear-probe", "trains for hours with upstream's numbers"),
    ("-weights ", "needs metric weight files"),
    ("sphinx", "the docs build (tests/test_docs_build.py)"),
)
MODELS = ("random:vtp-small", "./VTP-Small-f16d64", "/models/VTP-Small-f16d64", "/models/vtp-small")
JOBS = ("tokenize", "eval", "decode", "export")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it starts, its language and code, its skip marker's reason."""

    page: str
    line: int
    language: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"

    def cannot_run(self) -> list[str]:
        """Why this block cannot run in CI (empty: it can)."""
        return [why for what, why in CANNOT_RUN if what in self.code]


def page_blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` (MyST directives such as ``{toctree}`` included, with their ``{...}``)."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, language = i, lines[i][3:].strip()
            i += 1
            while lines[i] != "```":
                i += 1
            marker = MARKER.fullmatch(lines[start - 1]) if start else None
            code = "\n".join(lines[start + 1 : i]) + "\n"
            blocks.append(Block(page, start + 1, language, code, marker["reason"] if marker else None))
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]
EXAMPLE_BLOCKS = [b for b in BLOCKS if b.language in EXAMPLES]
RUNNABLE = [b for b in EXAMPLE_BLOCKS if b.skip is None]


def logical_lines(code: str) -> list[str]:
    """The lines of a bash block as the shell reads them: continuation lines joined, comments dropped."""
    lines = (line.split(" #")[0].strip() for line in code.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: its logical lines, split at ``&&`` / ``||`` / ``|``."""
    return [part.strip() for line in logical_lines(code) for part in re.split(r"\s*(?:&&|\|\||\|)\s*", line)]


def vtp_ray_commands(blocks: list[Block]) -> list[str]:
    found = []
    for block in blocks:
        if block.language == "bash":
            for command in shell_commands(block.code):
                words = shlex.split(command)
                while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words[:1] == ["vtp-ray"]:
                    found.append(shlex.join(words))
    return found


# ------------------------------------------------------------------------------------------------------ fast


def test_the_pages_have_examples_to_check() -> None:
    assert {"README.md", "docs/serving.md", "docs/datasets.md"} <= set(PAGES)
    commands = vtp_ray_commands(BLOCKS)
    assert len(commands) >= 20 and sum("curl " in b.code for b in RUNNABLE) >= 4
    assert len(RUNNABLE) >= 20 and len([b for b in EXAMPLE_BLOCKS if b.skip]) >= 10


def test_a_block_that_cannot_run_here_says_why() -> None:
    unmarked = {b.name: b.cannot_run() for b in EXAMPLE_BLOCKS if b.cannot_run() and b.skip is None}
    assert not unmarked, f"blocks that cannot run in CI need '<!-- skip: <reason> -->' on the line before: {unmarked}"


def test_every_skip_marker_stands_before_a_block() -> None:
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("<!-- skip"):
                assert MARKER.fullmatch(line), f"{page}:{number}: write '<!-- skip: <reason> -->' on a line of its own"
                following = lines[number] if number < len(lines) else ""
                assert following.startswith(("```bash", "```python")), f"{page}:{number}: no example block follows"


@pytest.mark.parametrize("block", [b for b in EXAMPLE_BLOCKS if b.skip], ids=lambda b: b.name)
def test_skipped_block(block: Block) -> None:
    pytest.skip(f"{block.name}: {block.skip}")


@pytest.mark.parametrize("command", vtp_ray_commands(BLOCKS))
def test_every_vtp_ray_command_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


def test_every_file_the_docs_name_exists() -> None:
    pattern = r"\b((?:examples|benchmarks|deployments|vtp_ray|tests|docs)/[\w./-]+\.(?:py|sh|yaml|md|html|json))"
    named = {path for page in PAGES for path in re.findall(pattern, (ROOT / page).read_text())}
    links = {
        os.path.normpath(os.path.join(os.path.dirname(page), link))
        for page in PAGES
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / page).read_text())
    }
    assert len(links) >= 20
    missing = sorted(p for p in named | links | {"serve_config.yaml", "ARCHITECTURE.md"} if not (ROOT / p).exists())
    assert not missing, missing


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and MyST's ``myst_heading_anchors``) gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_anchor_the_readme_links_to_exists() -> None:
    # Sphinx checks the docs pages' anchors (tests/test_docs_build.py); the README is GitHub's alone.
    links = re.findall(r"\]\(([^)#:]+\.md)#([^)]+)\)", (ROOT / "README.md").read_text())
    assert links
    for path, anchor in links:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
        assert anchor in {github_anchor(h) for h in headings}, f"README links to {path}#{anchor}: no such heading"


def test_nothing_in_the_repository_points_outside_it() -> None:
    outside = "../" + "shared"  # spelled apart, so that this file does not name it
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    text_files = [p for p in tracked if p.endswith((".py", ".md", ".yaml", ".sh", ".toml", ".txt", ".cfg"))]
    offenders = [p for p in text_files if (ROOT / p).is_file() and outside in (ROOT / p).read_text()]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------- the error table


def error_table() -> dict[int, str]:
    """The serving page's error table: status -> gRPC status name."""
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d{3}) \| `(\w+)` \|", section, re.M)
    statuses = [int(status) for status, _ in rows]
    assert len(statuses) == len(set(statuses)), f"a status appears twice in the error table: {statuses}"
    return {int(status): grpc for status, grpc in rows}


def _ints(node: ast.AST | None, assigned: dict[str, ast.AST]) -> set[int]:
    """The integer literals a status expression can take (constants, ``a if c else b``, a local variable)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _ints(node.body, assigned) | _ints(node.orelse, assigned)
    if isinstance(node, ast.Name) and node.id in assigned:
        return _ints(assigned[node.id], assigned)
    return set()


def answered_statuses() -> set[int]:
    """Every error status the app's code answers with: the status argument of ``ApiError`` and its subclasses,
    ``error_response`` and ``JSONResponse``, read from the source of ``deployments/``."""
    found: set[int] = set()
    for path in (ROOT / "deployments").rglob("*.py"):
        tree = ast.parse(path.read_text())
        subclasses = {
            c.name
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and any(ast.unparse(b) == "ApiError" for b in c.bases)
        }
        for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            assigned = {
                t.id: n.value
                for n in ast.walk(function)
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                name = ast.unparse(call.func)
                if name in ("ApiError", "error_response", *subclasses) or (name == "super().__init__" and subclasses):
                    status = call.args[0] if call.args else None
                elif name == "JSONResponse":
                    keyword = next((k.value for k in call.keywords if k.arg == "status_code"), None)
                    status = keyword or (call.args[1] if len(call.args) > 1 else None)
                else:
                    continue
                found |= {s for s in _ints(status, assigned) if s >= 400}
    return found


def test_the_error_table_lists_exactly_the_statuses_the_code_answers_with() -> None:
    import grpc

    from deployments.oip.grpc_service import STATUS_CODES

    table, answered = error_table(), answered_statuses()
    assert {400, 401, 404, 413, 429, 503} <= answered  # the scan finds the app's refusals
    assert sorted(answered - set(table)) == [], "statuses the code answers with, missing from docs/serving.md's table"
    assert sorted(set(table) - answered) == [], "statuses in docs/serving.md's table that the code never answers with"
    grpc_names = {status: STATUS_CODES.get(status, grpc.StatusCode.UNKNOWN).name for status in table}
    assert table == grpc_names, "the table's gRPC column differs from deployments/oip/grpc_service.STATUS_CODES"


# ------------------------------------------------------------------------------------------------------ runs


def _takes(command: str, option: str) -> bool:
    """Whether ``vtp-ray <command>`` has the flag ``option``."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return option in commands.choices[command]._option_string_actions


def substitute(code: str, sandbox: Path, ports: dict[str, str] | None = None) -> str:
    """The block as the test runs it: the tiny checkpoint, generated data, the test's ports (see the docstring)."""
    for model in MODELS:
        code = code.replace(model, TINYTEXT)
    code = code.replace("/data/", f"{sandbox}/data/").replace("/tmp/latents", "tmp-latents")
    code = code.replace('"OUT/', f'"{sandbox}/data/latents/in1k-256/')  # the datasets page's tokenize output
    for name, port in (ports or {}).items():
        code = code.replace(name, port)
    lines = []
    for line in code.split("\n"):
        match = re.search(r"vtp-ray (\w+)", line)
        if match and "--compare" not in line and match.group(1) in (*JOBS, "reconstruct", "verify", "bench"):
            command, extra = match.group(1), []
            if _takes(command, "--size"):
                line = line.replace("--size 256", f"--size {SIZE}")
                extra += [] if "--size" in line else ["--size", str(SIZE)]
            if command in JOBS and _takes(command, "--resources") and "--resources" not in line:
                extra += ["--resources", "cpu"]
            line = line.replace(match.group(0), " ".join([match.group(0), *extra]), 1)
        lines.append(line)
    return "\n".join(lines)


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of the examples, with every file they name."""
    root = tmp_path_factory.mktemp("docs")
    for name, seed in (("photo.jpg", 1), ("cat.jpg", 2), ("a.jpg", 3), ("b.png", 4)):
        Image.fromarray(random_image(90, 120, seed)).save(root / name)
    jpegs = {}
    for i in range(6):
        path = root / "photos" / f"class{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(70, 80, 10 + i)).save(path)
        jpegs[f"{i:06d}"] = path.read_bytes()
    for tree in ("imagenet/train", "imagenet/val", "val", "flowers"):
        shutil.copytree(root / "photos", root / "data" / tree)
    (root / "names.txt").write_text("first class\nsecond class\n")
    shards = {"cc12m": "{i:05d}.tar", "imagenet-wds": "imagenet-val-{i:04d}.tar"}
    for directory, name in shards.items():
        (root / "data" / directory).mkdir(parents=True)
        for i, keys in enumerate((sorted(jpegs)[:3], sorted(jpegs)[3:])):
            members = {k: {"jpg": jpegs[k], "cls": str(int(k) % 2).encode(), "json": b'{"label": "x"}'} for k in keys}
            _write_tar(root / "data" / directory / name.format(i=i), members)
            if directory == "imagenet-wds":
                _write_tar(root / "data" / directory / name.format(i=i).replace("-val-", "-train-"), members)
    (root / "data" / "hub" / "imagenet-1k" / "data").mkdir(parents=True)
    write_parquet(root / "data" / "hub" / "imagenet-1k" / "data" / "train-00000.parquet", jpegs, hub=True)
    (root / "data" / "tokenized").mkdir()
    (root / "data" / "tokenized" / "imagenet").symlink_to(root / "data" / "latents" / "in1k-256")  # tokenize's
    latents = np.random.default_rng(0).standard_normal((3, 8, SIZE // 16, SIZE // 16)).astype(np.float32)
    np.save(root / "data" / "samples.npy", latents)
    np.savez(root / "data" / "samples.npz", arr_0=latents)
    return root


@dataclass
class Ran:
    block: Block
    returncode: int
    output: str
    seconds: float

    def failure(self) -> str:
        return f"{self.block.name} exited {self.returncode}:\n{self.block.code}\n--- output\n{self.output[-3000:]}"


def _env(ray_address: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    env["VTP_API_KEY"] = "unused"  # the examples that send a key; the test's app has none
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def run_bash(block: Block, sandbox: Path, env: dict[str, str], ports: dict[str, str] | None = None) -> Ran:
    script = substitute(block.code, sandbox, ports).replace("curl -s ", "curl -s --fail-with-body ")
    started = time.perf_counter()
    result = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script], cwd=sandbox, env=env, capture_output=True, text=True, timeout=300
    )
    return Ran(block, result.returncode, result.stdout + result.stderr, time.perf_counter() - started)


def run_python(blocks: list[Block], sandbox: Path, env: dict[str, str], ports: dict[str, str] | None = None) -> Ran:
    """``blocks`` (of one page) in one interpreter, in order."""
    code = "\n".join(substitute(b.code, sandbox, ports) for b in blocks)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-"], input=code, cwd=sandbox, env=env, capture_output=True, text=True, timeout=300
    )
    return Ran(blocks[0], result.returncode, result.stdout + result.stderr, time.perf_counter() - started)


def _talks_to_the_app(block: Block) -> bool:
    return "localhost:800" in block.code


def _is_job(block: Block) -> bool:
    return block.language == "bash" and any(re.search(rf"vtp-ray {job}\b", block.code) for job in JOBS)


def _python_by_page(blocks: list[Block]) -> list[list[Block]]:
    pages: dict[str, list[Block]] = {}
    for block in blocks:
        pages.setdefault(block.page, []).append(block)
    return list(pages.values())


#: Runs steps in one interpreter: ``vtp-ray`` commands through ``main`` (what the ``vtp-ray`` script calls) and
#: Python blocks through ``exec``, each page in a namespace of its own. The steps then share one Python start-up, one
#: import of torch and Ray, and (jobs) one connection to the shared Ray, which the jobs' own code uses: most of what
#: a command on the tiny checkpoint costs. A marker line before and after each step frames its output.
DRIVER = """
import json, logging, os, sys, time, traceback
if os.environ.get("RAY_ADDRESS"):
    import ray
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
from vtp_ray.cli import main

for index, (kind, step) in enumerate(json.loads(sys.argv[1])):
    print(f"\\n@@@ start {index}", flush=True)
    started = time.perf_counter()
    try:
        if kind == "argv":
            code = main(step)
        else:
            exec(compile(step, f"<step {index}>", "exec"), {"__name__": "__main__"})
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"\\n@@@ end {index} {code} {time.perf_counter() - started:.1f}", flush=True)
"""


Step = tuple[str, object]  # ("argv", [...]) or ("python", code)


def in_one_interpreter(steps: list[tuple[Block, list[Step]]], sandbox: Path, env: dict[str, str]) -> list[Ran]:
    """Each block's steps (``("argv", [...])`` or ``("python", code)``) in one interpreter (``DRIVER``); a step the
    same as an earlier one (the same command after the substitutions) runs once."""
    unique: list[Step] = []
    of_block = []
    for _, block_steps in steps:
        unique += [step for step in block_steps if step not in unique]
        of_block.append([unique.index(step) for step in block_steps])
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(unique)],
        cwd=sandbox,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    outputs: dict[int, str] = {}
    ends: dict[int, tuple[int, float]] = {}
    parts = re.split(r"^@@@ (start|end) (\d+)(.*)\n", result.stdout, flags=re.M)
    for kind, index, rest, text in zip(parts[1::4], parts[2::4], parts[3::4], parts[4::4], strict=True):
        if kind == "start":
            outputs[int(index)] = text
        else:
            code, took = rest.split()
            ends[int(index)] = (int(code), float(took))
    ran = []
    for (block, _), indices in zip(steps, of_block, strict=True):
        codes = [ends.get(i, (1, 0.0))[0] for i in indices]  # no end marker: the interpreter died (its output says why)
        output = "".join(outputs.get(i, "") for i in indices) or result.stdout[-5000:]
        seconds = sum(ends.get(i, (0, 0.0))[1] for i in set(indices))
        ran.append(Ran(block, next((c for c in codes if c != 0), 0), output, seconds))
    return ran


def cli_steps(block: Block, sandbox: Path) -> list[Step] | None:
    """A bash block of ``vtp-ray`` commands alone as ``main`` steps; None for a block that needs the shell."""
    lines = logical_lines(substitute(block.code, sandbox))
    if any(not line.startswith("vtp-ray ") or re.search(r"[|&;$<>`]", line) for line in lines):
        return None
    return [("argv", shlex.split(line)[1:]) for line in lines]


def run_plain(sandbox: Path) -> list[Ran]:
    """The blocks that need neither Ray nor the app: one-process commands, the shell's examples, and the Python of
    the model and the replica (a page's blocks in order, in one namespace)."""
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    bash = [b for b in RUNNABLE if b.language == "bash" and not _is_job(b) and not _talks_to_the_app(b)]
    python = [b for b in RUNNABLE if b.language == "python" and not _talks_to_the_app(b)]
    python = [b for b in python if b.page != "docs/datasets.md"]
    shell = [run_bash(b, sandbox, env) for b in bash if cli_steps(b, sandbox) is None]
    steps = [(b, cli_steps(b, sandbox) or []) for b in bash if cli_steps(b, sandbox) is not None]
    for page in _python_by_page(python):
        steps.append((page[0], [("python", "\n".join(substitute(b.code, sandbox) for b in page))]))
    return shell + in_one_interpreter(steps, sandbox, env)


#: The jobs of these pages read nothing the others write, so they run beside the rest, in a second interpreter.
INDEPENDENT_JOBS = ("docs/evaluation.md",)


def run_jobs(sandbox: Path, ray_address: str, pages: tuple[str, ...], *, exclude: bool = False) -> list[Ran]:
    """The Ray jobs of ``pages`` (or of every other page), in page order: a page may read what an earlier one wrote.
    Then, if the datasets page is among them, its Python, which reads tokenize's output, in a fresh interpreter as
    a reader would run it."""
    blocks = [b for b in RUNNABLE if _is_job(b) and (b.page in pages) != exclude]
    steps = [(b, cli_steps(b, sandbox)) for b in blocks]
    assert all(s for _, s in steps), "a job block holds vtp-ray commands alone"
    env = _env(ray_address)
    ran = in_one_interpreter(steps, sandbox, env)  # type: ignore[arg-type]
    reading = [b for b in RUNNABLE if b.language == "python" and b.page == "docs/datasets.md"]
    return [*ran, run_python(reading, sandbox, env)] if any(b.page == "docs/datasets.md" for b in blocks) else ran


@pytest.fixture(scope="module")
def background(sandbox: Path, ray_runtime: str) -> Iterator[dict[str, Future[list[Ran]]]]:
    """The plain blocks and the jobs (two independent chains: the shared Ray has CPUs for two jobs beside the app),
    started at once in threads of their own; the app's clients run in the test's thread."""
    with ThreadPoolExecutor(3, thread_name_prefix="docs-examples") as pool:
        yield {
            "plain": pool.submit(run_plain, sandbox),
            "jobs": pool.submit(run_jobs, sandbox, ray_runtime, INDEPENDENT_JOBS, exclude=True),
            "more jobs": pool.submit(run_jobs, sandbox, ray_runtime, INDEPENDENT_JOBS),
        }


@pytest.fixture(scope="module")
def app_ports(serve_instance: ServeInstance) -> dict[str, str]:
    """The docs' app (the tiny checkpoint with CLIP's real vocabulary, so that the text examples run too) on the
    shared Serve: what ``localhost:8000`` and ``localhost:8001`` become."""
    from serving import deploy

    from deployments import AppSettings, compose_app

    settings = AppSettings(model=TINYTEXT, placement="cpu", image_size=SIZE, rate_limits=UNLIMITED)
    deploy(compose_app(settings), "vtp", "/")
    return {"localhost:8000": f"127.0.0.1:{serve_instance.http_port}", "localhost:8001": serve_instance.grpc_target}


def check(ran: list[Ran]) -> None:
    """Every block exited 0; prints each block's time (``pytest -s`` shows it)."""
    for r in ran:
        print(f"{r.seconds:6.1f} s  {r.block.name}")
    failed = [r.failure() for r in ran if r.returncode != 0]
    assert not failed, "\n\n".join(failed)


@pytest.mark.slow
def test_the_app_examples_run(background: dict, app_ports: dict[str, str], sandbox: Path) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (the docs' examples use it): apt-get install curl")
    env = _env()
    clients = [b for b in RUNNABLE if _talks_to_the_app(b)]
    ran = [run_bash(b, sandbox, env, app_ports) if b.language == "bash" else run_python([b], sandbox, env, app_ports)
           for b in clients]  # fmt: skip
    check(ran)
    assert len(ran) >= 8
    assert Image.open(sandbox / "recon512.png").size == (512, 512)
    assert np.load(sandbox / "cat.npy").shape == (8, SIZE // 16, SIZE // 16)
    assert Image.open(sandbox / "decoded.png").size == (SIZE, SIZE)
    grpc = next(r for r in ran if "tritonclient.grpc" in r.block.code)
    assert "(1, 512, 512, 3)" in grpc.output  # the size parameter went through


@pytest.mark.slow
def test_the_one_process_examples_run(background: dict, sandbox: Path) -> None:
    ran = background["plain"].result()
    check(ran)
    assert (sandbox / "recon" / "photo.png").is_file()
    assert any("vtp-ray verify" in r.block.code for r in ran) and any("VTPModel" in r.block.code for r in ran)


@pytest.mark.slow
def test_the_job_examples_run(background: dict, sandbox: Path) -> None:
    ran = background["jobs"].result() + background["more jobs"].result()
    check(ran)
    assert (sandbox / "data" / "latents" / "in1k-256" / "stats.json").is_file()
    assert (sandbox / "data" / "latents" / "vtp-s-256" / "latents_stats.pt").is_file()
    assert (sandbox / "runs" / "flowers" / "report.json").is_file()
