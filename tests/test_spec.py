"""The settings every job shares (``PipelineSpec``, ``Preprocessing``), the model facts a driver reads, block sizing,
and which processes stay torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY

from vtp_ray.pipeline import ModelFacts, PipelineSpec, Preprocessing
from vtp_ray.pipeline.served import ServeTarget
from vtp_ray.pipeline.stages import BLOCK_BYTES, block_rows


def test_model_facts_come_from_the_config_alone(tiny_dir: Path):
    facts = ModelFacts.of(str(tiny_dir))
    assert facts.random_weights is False and facts.latent_channels == 8 and facts.embedding_dim == 64
    assert Path(facts.spec).is_absolute()
    assert ModelFacts.of("random:vtp-small").latent_channels == 64
    with pytest.raises(FileNotFoundError, match="random:vtp-small"):
        ModelFacts.of("no/such/checkpoint")
    with pytest.raises(ValueError, match="patch size"):
        ModelFacts.of(str(tiny_dir), size=40)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"precision": "int8"}, "precision"),
        ({"replicas": (3, 1)}, "replicas"),
        ({"preprocess_cpus": 0}, "preprocess_cpus"),
        ({"cpu_threads": 0}, "cpu_threads"),
        ({"cpu_threads": "some"}, "cpu_threads"),
        ({"cpu_threads": True}, "cpu_threads"),
    ],
)
def test_a_spec_with_bad_settings_is_refused(bad: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PipelineSpec("random:vtp-small", **bad)


@pytest.mark.parametrize(
    ("bad", "match"), [({"size": 40}, "size"), ({"size": True}, "size"), ({"crop": "diagonal"}, "crop")]
)
def test_preprocessing_with_bad_settings_is_refused(bad: dict, match: str):
    with pytest.raises(ValueError, match=match):
        Preprocessing(**bad)
    with pytest.raises(TypeError, match="Preprocessing"):
        PipelineSpec("random:vtp-small", preprocessing=256)


def test_blocks_hold_whole_model_batches_sized_for_the_work():
    spec = PipelineSpec(model=TINY, preprocessing=Preprocessing(64), batch_size=32)
    by_bytes = BLOCK_BYTES // (64 * 64 * 3)
    assert block_rows(spec, 1_000_000, cpus=2) == -(-by_bytes // 32) * 32  # about BLOCK_BYTES of pixels
    assert block_rows(spec, 20_000, cpus=2) == 1280  # >= 4 blocks per preprocess slot (2 CPUs / 0.5 per task)
    assert block_rows(spec, 10, cpus=2) == 32  # never less than one model batch
    big = PipelineSpec(model=TINY, preprocessing=Preprocessing(256), batch_size=48)
    assert block_rows(big, 1_000_000, cpus=64) % 48 == 0 and block_rows(big, 1_000_000, cpus=64) * 3 * 256**2 < 2**26
    assert block_rows(PipelineSpec(model=TINY, preprocessing=Preprocessing(64), block_size=100), 20_000, cpus=2) == 100
    with pytest.raises(ValueError, match="block_size"):
        PipelineSpec(model=TINY, block_size=0)


def test_blocks_are_sized_for_the_preprocess_tasks_that_run_at_once():
    # On an app a job runs a quarter of the CPUs' preprocess tasks: four blocks for each of those, not for the
    # eight tasks 4 CPUs could hold, else every block pays Ray Data's per-block cost for a fraction of the work.
    spec = PipelineSpec(model=TINY, preprocessing=Preprocessing(64), batch_size=32)
    on_app = PipelineSpec(model=TINY, preprocessing=Preprocessing(64), batch_size=32, serve=ServeTarget("fleet"))
    assert (spec.preprocess_slots(4), on_app.preprocess_slots(4), on_app.preprocess_slots(16)) == (8, 1, 4)
    assert block_rows(spec, 2000, cpus=4) == 64 and block_rows(on_app, 2000, cpus=4) == 512
    assert on_app.preprocess_tasks(4)["compute"].size == 1
    told = PipelineSpec(model=TINY, preprocessing=Preprocessing(64), preprocess_concurrency=2)
    assert told.preprocess_slots(4) == 2 and block_rows(told, 2000, cpus=4) == 256
    assert told.preprocess_slots(0.5) == 1  # never fewer than one


@pytest.mark.slow
def test_the_sources_stages_and_job_drivers_never_import_torch():
    # Ray Data runs the sources' reads and the preprocess stage in processes of its own, on every node, and a job's
    # driver only needs the model's config (patch size, channels, digest): torch would add seconds and hundreds of
    # MB to each of them for nothing.
    modules = ", ".join(
        f"vtp_ray.pipeline.{name}"
        for name in (
            *("sources.files", "sources.webdataset", "sources.parquet", "sources.find", "stages", "store"),
            *("jobs.tokenize", "jobs.lightningdit", "jobs.evaluate", "jobs.zeroshot", "jobs.decode", "report"),
        )
    )
    code = (
        f"import sys, {modules}; from vtp_ray.pipeline.spec import ModelFacts; "
        f"facts = ModelFacts.of({TINY!r}, 32), ModelFacts.of('random:vtp-small'); "
        "print(facts[0].patch_size, facts[1].latent_channels, sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["16", "64", "[]"]
