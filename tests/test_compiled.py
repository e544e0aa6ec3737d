"""Compiled replicas (``compile="on"``): compiled outputs against eager ones, no compile on the calling path,
readiness, the cap on graphs, dynamo's recompile limit, and the persistent cache read by a second process.

Compiling costs seconds to tens of seconds even for the tiny model on 2 cores: the replicas are module fixtures,
and every test shares one cache directory, so that only the first compile of each graph is cold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

from vtp_ray import VTPReplica
from vtp_ray.cli import main
from vtp_ray.compile_plan import cache_key, cpu_has_matrix_engine, plan_compile, use_compile_cache
from vtp_ray.compiled import CompiledModel
from vtp_ray.model import load_model

# Compiled against eager, the same precision, any x86-64 CPU: inductor fuses and reorders the float32 arithmetic
# around the same GEMMs; in bfloat16 it also rounds intermediates differently (it keeps fused chains in float32).
# Normalized max error (max |compiled - eager| / max |eager|) for latents and CLIP embedding; pixel levels for the
# reconstruction.
TOLERANCES = {
    "fp32": {"latents": 1e-4, "clip": 1e-4, "pixels": 1},
    "bf16": {"latents": 3e-2, "clip": 3e-2, "pixels": 8},
}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("compile-cache"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def eager(tiny_dir) -> VTPReplica:
    return VTPReplica(str(tiny_dir), device="cpu", precision="fp32", warmup_size=0)


@pytest.fixture(scope="module")
def compiled(tiny_dir, compile_cache) -> VTPReplica:
    replica = VTPReplica(
        str(tiny_dir), device="cpu", warmup_size=64, compile="on", compile_cache=compile_cache, compile_max_batch=4
    )
    assert not replica.compile_ready  # the constructor returns while the graphs compile in the background
    assert replica.wait_compiled(timeout=600)
    return replica


def _compare(compiled: VTPReplica, eager: VTPReplica, images: np.ndarray, precision: str) -> None:
    limits = TOLERANCES[precision]
    a, b = compiled.encode(images), eager.encode(images)
    assert rel_err(torch.from_numpy(a.latents), torch.from_numpy(b.latents)) < limits["latents"]
    assert rel_err(torch.from_numpy(a.clip_embedding), torch.from_numpy(b.clip_embedding)) < limits["clip"]
    np.testing.assert_allclose(compiled.embed(images), a.clip_embedding, rtol=0, atol=1e-6)
    recon_a, recon_b = compiled.reconstruct(images), eager.reconstruct(images)
    assert np.abs(recon_a.astype(int) - recon_b).max() <= limits["pixels"]
    decoded_a, decoded_b = compiled.decode(b.latents), eager.decode(b.latents)
    assert np.abs(decoded_a.astype(int) - decoded_b).max() <= limits["pixels"]


@pytest.mark.slow
def test_compiled_fp32_matches_eager_at_batch_1_and_the_dynamic_batch(compiled, eager, images):
    status = compiled.compile_status()
    assert status.compiled and status.backend == "inductor" and status.ready
    assert set(status.graphs) == {
        "encoder 1x3x64x64", "encoder 2-4x3x64x64", "decoder 1x8x4x4", "decoder 2-4x8x4x4"
    }  # fmt: skip
    before = status.compiled_calls
    for batch in (images[:1], images[:2], images):  # batch 1, and 2 and 3 in the one dynamic graph
        _compare(compiled, eager, batch, "fp32")
    status = compiled.compile_status()
    assert status.compiled_calls - before == 3 * 5  # encode, embed, reconstruct (2 graphs), decode: all ran compiled
    assert status.eager_calls == {} and status.compiles_on_calling_path == 0 and status.failed == {}
    assert compiled.info.compile == status  # what /v1/model and the job reports show


@pytest.mark.slow
def test_batches_over_the_largest_graph_run_in_chunks(compiled, eager, images):
    many = np.concatenate([images, images[::-1], images[:1]])  # 7 images: 4 + 3
    before = compiled.compile_status().compiled_calls
    out = compiled.encode(many)
    assert compiled.compile_status().compiled_calls - before == 2
    assert rel_err(torch.from_numpy(out.latents), torch.from_numpy(eager.encode(many).latents)) < 1e-4


@pytest.mark.slow
def test_a_new_shape_runs_eagerly_and_compiles_off_the_calling_path(compiled, eager, images):
    on_compile: list[str] = []
    handler = getattr(torch._dynamo, "callback_handler", None)  # torch >= 2.6: an independent witness

    def record(_args) -> None:
        on_compile.append(threading.current_thread().name)

    if handler is not None:
        handler.register_start_callback(record)
    # A thread alive meanwhile takes the stack of the compile worker that exited, so the next worker gets another
    # ident: what counts as the calling path must not go by a thread's ident.
    parked = threading.Event()
    threading.Thread(target=parked.wait, daemon=True).start()
    try:
        # 48x64: no graph yet (batch 1: a static graph, which compiles in a fraction of the dynamic one's time)
        wide = images[:1, :48]
        before = compiled.compile_status()
        out = compiled.encode(wide)
        queued = compiled.compile_status()
        # The call ran eagerly and returned while its graph was still queued or compiling.
        assert "encoder 1x3x48x64" in queued.pending
        assert queued.eager_calls["compiling"] == before.eager_calls.get("compiling", 0) + 1
        np.testing.assert_array_equal(out.latents, eager.encode(wide).latents)  # eager is eager, bit for bit
        assert compiled.wait_compiled(timeout=600, all_shapes=True)
        after = compiled.encode(wide)
    finally:
        parked.set()
        if handler is not None:
            handler.remove_start_callback(record)
    status = compiled.compile_status()
    assert "encoder 1x3x48x64" in status.graphs and status.compiled_calls == queued.compiled_calls + 1
    assert rel_err(torch.from_numpy(after.latents), torch.from_numpy(out.latents)) < 1e-4
    assert status.compiles_on_calling_path == 0
    if handler is not None:
        assert on_compile and set(on_compile) == {"vtp-compile"}, on_compile


@pytest.mark.slow
def test_shapes_past_the_cap_stay_eager(tiny_dir, compile_cache, images):
    model = load_model(str(tiny_dir)).model
    plan = plan_compile("on", torch.device("cpu"), torch.float32)
    cache = use_compile_cache(compile_cache, torch.device("cpu"))
    graphs = CompiledModel(model, torch.device("cpu"), plan, max_batch=1, max_graphs=1, cache_dir=cache)
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode():
        graphs.encoder(x)  # queued: the one graph this cap allows
        graphs.encoder(torch.zeros(1, 3, 32, 64))  # over the cap: eager for good
        graphs.encoder(torch.zeros(1, 3, 32, 64))
        assert graphs.wait_idle(timeout=600)
        graphs.encoder(x)
    status = graphs.status("on")
    assert status.graphs == ("encoder 1x3x64x64",) and status.over_cap == ("encoder 1x3x32x64",)
    assert status.eager_calls == {"compiling": 1, "over_cap": 2} and status.compiled_calls == 1


@pytest.mark.slow
def test_dynamos_recompile_limit_is_reported_not_silent(tiny_dir, compile_cache):
    model = load_model(str(tiny_dir)).model
    plan = plan_compile("on", torch.device("cpu"), torch.float32)
    cache = use_compile_cache(compile_cache, torch.device("cpu"))
    graphs = CompiledModel(model, torch.device("cpu"), plan, max_batch=1, cache_dir=cache, recompile_limit=1)
    with torch.inference_mode():
        graphs.decoder(torch.zeros(1, 8, 4, 4))
        assert graphs.wait_idle(timeout=600)
        graphs.decoder(torch.zeros(1, 8, 2, 4))  # a second graph of the same function: past the limit
        assert graphs.wait_idle(timeout=600)
        out = graphs.decoder(torch.zeros(1, 8, 2, 4))
    status = graphs.status("on")
    assert status.graphs == ("decoder 1x8x4x4",)
    assert "past dynamo's recompile limit (1 graphs" in status.failed["decoder 1x8x2x4"]
    assert status.eager_calls == {"compiling": 2, "failed": 1} and out.shape == (1, 3, 32, 64)


@pytest.mark.slow
@pytest.mark.soak  # bf16 graphs of their own, cold: 10-25 s of CI's 15 minutes (bf16 GEMMs crawl without AVX-512 BF16)
def test_bf16_compiled_matches_eager(tiny_dir, compile_cache, images):
    eager = VTPReplica(str(tiny_dir), device="cpu", precision="bf16", warmup_size=0)
    compiled = VTPReplica(
        str(tiny_dir), device="cpu", precision="bf16", warmup_size=64, compile="on", compile_cache=compile_cache,
        compile_max_batch=1,
    )  # fmt: skip
    assert compiled.wait_compiled(timeout=600)
    _compare(compiled, eager, images[:1], "bf16")
    status = compiled.compile_status()
    assert len(status.graphs) == 2 and status.eager_calls == {} and status.compiled_calls == 5


@pytest.mark.slow
@pytest.mark.soak  # a fresh process importing and compiling: CI's budget
def test_a_second_process_compiles_from_the_cache(compiled, compile_cache, tiny_dir):
    """A new replica process with the filled cache loads every graph from it (inductor's FX graph / AOTAutograd
    caches) instead of compiling cold."""
    code = (
        "import json; from vtp_ray import VTPReplica;"
        f"r = VTPReplica({str(tiny_dir)!r}, device='cpu', warmup_size=64, compile='on', compile_max_batch=4);"
        "r.wait_compiled(600); print(json.dumps(r.compile_status().to_dict()))"
    )
    env = {**os.environ, "VTP_COMPILE_CACHE": compile_cache}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["ready"] and len(status["graphs"]) == 4, status
    assert status["cache_hits"] == 4 and status["cache_misses"] == 0, status
    assert status["cache_dir"] == compiled.compile_status().cache_dir


def test_auto_compiles_low_precision_where_the_cpu_has_a_matrix_engine():
    cpu = torch.device("cpu")
    assert not plan_compile("off", cpu, torch.bfloat16).enabled
    fp32 = plan_compile("auto", cpu, torch.float32)
    assert not fp32.enabled and fp32.reason.startswith("auto: eager (fp32 on a CPU")
    bf16 = plan_compile("auto", cpu, torch.bfloat16)
    assert bf16.enabled == cpu_has_matrix_engine(torch.bfloat16), bf16  # AMX: measured to pay; AVX512-BF16: not
    assert bf16.enabled or bf16.reason == "auto: eager (bf16 on a CPU without AMX: compiling is not known to pay)"
    assert plan_compile("on", cpu, torch.float32).backend == "inductor"
    with pytest.raises(ValueError, match="compile mode"):
        plan_compile("yes", cpu, torch.float32)


def test_cuda_compiles_with_inductor_and_no_cuda_graphs():
    # Inductor's CUDA graphs (mode="reduce-overhead") broke on an H200: graphs recorded on the compile thread failed
    # on the calling thread, and each call overwrote the outputs of the call before. Planning needs no GPU.
    cuda = torch.device("cuda")
    plan = plan_compile("auto", cuda, torch.bfloat16)
    assert plan.backend == "inductor" if plan.enabled else "triton" in plan.reason, plan
    assert "CUDA graph" not in plan.reason
    assert not plan_compile("auto", cuda, torch.float32).enabled


def test_the_cache_directory_is_named_for_this_machine_class(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    key = cache_key(torch.device("cpu"))
    assert key.startswith(f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-".lower())
    assert torch.backends.cpu.get_cpu_capability().lower() in key
    path = use_compile_cache(tmp_path, torch.device("cpu"))
    assert path == tmp_path / key and path.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    monkeypatch.setenv("VTP_COMPILE_CACHE", str(tmp_path / "env"))
    assert use_compile_cache(None, torch.device("cpu")) == tmp_path / "env" / key
    monkeypatch.delenv("VTP_COMPILE_CACHE")
    default = Path(tempfile.gettempdir(), f"vtp-ray-compile-{os.getuid()}")  # never inductor's unpartitioned one
    assert use_compile_cache(None, torch.device("cpu")) == default / key


@pytest.mark.slow
def test_without_a_cpp_compiler_the_replica_says_so_and_runs_eagerly(tiny_dir, tmp_path):
    code = (
        "import json; from vtp_ray import VTPReplica;"
        f"r = VTPReplica({str(tiny_dir)!r}, device='cpu', warmup_size=0, compile='on');"
        "import numpy as np; r.encode(np.zeros((1, 64, 64, 3), np.uint8));"
        "print(json.dumps(r.info.compile.to_dict()))"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "no-such-compiler"}  # no g++, c++ or clang++ to find
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["compiled"] is False and "needs a C++ compiler" in status["reason"], status
    assert "needs a C++ compiler" in out.stderr  # the one log line


def _cli(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VTP_COMPILE_CACHE": cache}
    command = [sys.executable, "-m", "vtp_ray.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_verify_compile_checks_the_compiled_graphs_against_eager_and_cpu_fp32(
    compiled, compile_cache, tiny_dir, capsys, monkeypatch
):
    # In-process (the graphs from this session's cache): what is checked is verify's report, not a process.
    monkeypatch.setenv("VTP_COMPILE_CACHE", compile_cache)
    code = main(["verify", "--model", str(tiny_dir), "--size", "64", "--compile", "on"])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    lines = printed.out.splitlines()
    assert lines[0].startswith("verify cpu fp32 compiled") and lines[1].startswith("compile: inductor, 2 graphs")
    assert "eager calls 0" in lines[1] and lines[-1] == "PASS"
    assert {line.split()[0] + " " + line.split()[1] for line in lines if " vs eager " in f" {line} "} == {
        "img_feat vs", "latents vs", "reconstruction vs"
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.soak  # a fresh process importing and compiling: CI's budget
def test_bench_compile_puts_compiled_rows_beside_the_eager_ones(compiled, compile_cache, tiny_dir):
    result = _cli(
        "bench", "--model", str(tiny_dir), "--size", "64", "--batch-sizes", "1,4", "--verbs", "encode,reconstruct",
        "--warmup", "1", "--runs", "1", "--compile", "on", "--json", cache=compile_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    keys = {(r["compiled"], r["batch"], r["verb"]) for r in rows}
    assert keys == {(c, b, v) for c in (False, True) for b in (1, 4) for v in ("encode", "reconstruct")}
    assert all((r["speedup"] is not None) == r["compiled"] and r["seconds"] > 0 for r in rows)


def test_every_model_command_takes_the_compile_flags():
    """The one-process commands default to eager (what they measure is eager unless asked); the jobs and the Serve
    app to auto."""
    from vtp_ray.cli import build_parser
    from vtp_ray.cli.args import pipeline_spec

    args = build_parser().parse_args(["verify", "--model", "m", "--compile", "auto", "--compile-cache", "/c"])
    assert (args.compile, args.compile_cache) == ("auto", "/c")
    assert build_parser().parse_args(["bench", "--model", "m"]).compile == "off"
    job = build_parser().parse_args(["tokenize", "in", "-o", "out", "--model", "m", "--compile", "on"])
    assert pipeline_spec(job).compile == "on"
    assert build_parser().parse_args(["eval", "x", "-o", "y", "--model", "m"]).compile == "auto"


@pytest.mark.slow
def test_a_compiled_serve_replica_serves_only_once_its_graphs_are_ready(compiled, serve_instance, compile_cache):
    """The Serve app with compile on: its model replica compiles the graphs of image_size for every batch up to
    max_batch_size before Serve routes to it (from this session's cache: the graphs ``compiled`` made), so no request
    waits for a compile; /v1/model says it runs compiled; a job on the app that asks for eager replicas is refused
    before it reads anything."""
    import httpx
    from serving import deploy

    from deployments import AppSettings, compose_app

    settings = AppSettings(
        model=str(compiled.info.model_spec), image_size=64, placement={"num_cpus": 2}, compile="on",
        compile_cache=compile_cache, batching={"max_batch_size": 4},
    )  # fmt: skip
    url = deploy(compose_app(settings), "compiled", "/compiled")
    png = __import__("helpers").png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    answer = httpx.post(f"{url}/v1/reconstruct", content=png, headers={"content-type": "image/png"}, timeout=60)
    assert answer.status_code == 200
    status = httpx.get(f"{url}/v1/model", timeout=30).json()["compile"]
    assert status["mode"] == "on" and status["compiled"] and status["ready"]
    assert status["compiled_calls"] >= 2 and status["eager_calls"] == {} and status["compiles_on_calling_path"] == 0
    assert status["cache_hits"] >= 1  # a second process with the filled cache

    from vtp_ray.outputs import model_identity
    from vtp_ray.pipeline.served import ServeTarget, connect

    served = httpx.get(f"{url}/v1/model", timeout=30).json()
    asked = {mode: model_identity(served["config_digest"], False, "fp32", "float32", mode) for mode in ("on", "off")}
    assert connect(ServeTarget("compiled"), asked["on"]).info["compile"]["compiled"]
    with pytest.raises(ValueError, match=r"application 'compiled' serves vtp-tiny \(compiled: True served, False"):
        connect(ServeTarget("compiled"), asked["off"])
