"""Pipelines without Ray: input discovery, the preprocess stage, the output store and its statistics, CLI flags."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, TINY
from PIL import Image

from vtp_ray.cli.args import replicas_arg, resources_arg
from vtp_ray.images import ImageLimits
from vtp_ray.pipeline import ModelFacts, PipelineSpec, Preprocessing
from vtp_ray.pipeline.inputs import InputError, _glob_regex, discover_inputs
from vtp_ray.pipeline.runner import _actor_options
from vtp_ray.pipeline.stages import preprocess_rows
from vtp_ray.pipeline.store import (
    DATA_DIR,
    ERROR_SCHEMA,
    ERRORS_FILE,
    MANIFEST_FILE,
    STATS_FILE,
    ChannelStats,
    LatentStore,
    OutputMismatchError,
    row_schema,
)
from vtp_ray.pipeline.tokenize import build_manifest


def _image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _image(root / "b_class" / "2.png")
    _image(root / "a_class" / "1.jpg")
    _image(root / "a_class" / "deep" / "er" / "3.JPEG")
    _image(root / "top.webp")
    _image(root / ".cache" / "hidden.jpg")  # hidden directory: skipped
    _image(root / "a_class" / "._1.jpg")  # macOS resource fork: skipped
    (root / "a_class" / "notes.txt").write_text("not an image")
    return root


def _paths(inputs) -> list[str]:
    return inputs.table.column("path").to_pylist()


# ------------------------------------------------------------------------------------------ discovery


def test_a_directory_is_searched_recursively_for_images_with_first_level_labels(tree: Path):
    inputs = discover_inputs(str(tree), labels_from_dirs=True)
    assert _paths(inputs) == [
        str(tree / "a_class" / "1.jpg"),
        str(tree / "a_class" / "deep" / "er" / "3.JPEG"),
        str(tree / "b_class" / "2.png"),
        str(tree / "top.webp"),
    ]
    assert inputs.table.column("label").to_pylist() == ["a_class", "a_class", "b_class", None]
    assert discover_inputs(str(tree)).table.column("label").null_count == 4


def test_globs_match_within_a_component_and_across_with_double_star(tree: Path):
    assert _paths(discover_inputs(str(tree / "*" / "*.jpg"))) == [str(tree / "a_class" / "1.jpg")]
    assert _paths(discover_inputs(str(tree / "**" / "*.png"))) == [str(tree / "b_class" / "2.png")]
    labelled = discover_inputs(str(tree / "**" / "*.JPEG"), labels_from_dirs=True)
    assert labelled.table.column("label").to_pylist() == ["a_class"]
    assert _glob_regex("a/[!x]?.jpg").match("a/y1.jpg") and not _glob_regex("a/*.jpg").match("a/b/c.jpg")


def test_manifests_resolve_relative_paths_against_their_directory(tree: Path, tmp_path: Path):
    (tree / "list.txt").write_text("# a comment\na_class/1.jpg\n\nb_class/2.png\n")
    assert _paths(discover_inputs(str(tree / "list.txt"))) == [str(tree / "a_class/1.jpg"), str(tree / "b_class/2.png")]

    (tree / "list.csv").write_text("path,label\na_class/1.jpg,7\n" + f"{tree / 'top.webp'},8\n")
    csv = discover_inputs(str(tree / "list.csv"))
    assert _paths(csv) == [str(tree / "a_class/1.jpg"), str(tree / "top.webp")]
    assert csv.table.column("label").to_pylist() == ["7", "8"]  # labels are strings, whatever the manifest held

    (tree / "list.tsv").write_text("label\tpath\ncat\ta_class/1.jpg\n")
    assert discover_inputs(str(tree / "list.tsv")).table.column("label").to_pylist() == ["cat"]

    pq.write_table(pa.table({"path": ["b_class/2.png"], "label": [3]}), tree / "list.parquet")
    parquet = discover_inputs(str(tree / "list.parquet"))
    assert _paths(parquet) == [str(tree / "b_class/2.png")] and parquet.table.column("label").to_pylist() == ["3"]


def test_repeated_paths_are_kept_once_and_counted(tree: Path):
    (tree / "list.txt").write_text("a_class/1.jpg\n")
    inputs = discover_inputs([str(tree / "a_class"), str(tree / "list.txt"), f"file://{tree}/a_class/1.jpg"])
    assert len(inputs) == 2 and inputs.duplicates == 2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: root / "missing", "no such file"),
        (lambda root: root / "missing" / "*.jpg", "does not exist"),
        (lambda root: (root / "empty.txt").write_text("# nothing\n") and root / "empty.txt", "no input images"),
        (lambda root: (root / "x.xyz").write_bytes(b"?") and root / "x.xyz", "not a directory, glob, manifest"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no input images"),
    ],
)
def test_sources_that_name_no_images_are_refused(tree: Path, make, match: str):
    with pytest.raises(InputError, match=match):
        discover_inputs(str(make(tree)))


def test_a_manifest_without_a_path_column_is_refused(tree: Path):
    (tree / "bad.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(InputError, match="'path' column"):
        discover_inputs(str(tree / "bad.csv"))


# ----------------------------------------------------------------------------------- preprocess stage


def test_preprocess_turns_every_bad_input_into_an_error_row(tree: Path):
    (tree / "empty.jpg").write_bytes(b"")
    (tree / "text.jpg").write_text("hello")
    big = _image(tree / "big.png", (300, 200))
    good = tree / "a_class" / "1.jpg"
    paths = [str(good), str(tree / "empty.jpg"), str(tree / "text.jpg"), str(big), str(tree / "gone.jpg")]
    batch = pa.table({"path": paths, "label": ["x", None, None, None, None]})
    preprocessing = Preprocessing(32, limits=ImageLimits(max_pixels=50_000))
    out = preprocess_rows(batch, preprocessing=preprocessing, filesystem=None)
    assert out.column("reason").to_pylist() == [None, "empty", "not_an_image", "too_many_pixels", "unreadable"]
    assert out.column("error").null_count == 1 and all(out.column("error").to_pylist()[1:])
    assert out.column("width").to_pylist()[0] == 40 and out.column("height").to_pylist()[0] == 30
    assert out.column("image").type == pa.binary(32 * 32 * 3) and out.column("image").null_count == 4
    assert out.column("label").to_pylist() == ["x", None, None, None, None]


# --------------------------------------------------------------------------------------------- stats


def test_channel_stats_merge_to_numpys_mean_and_population_std():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, (n, 4, 3, 3)).astype(np.float32) for n in (1, 7, 300)]
    merged = ChannelStats.empty(4)
    for part in parts:
        merged = merged.merge(ChannelStats.from_json(ChannelStats.of(part).to_json()))
    everything = np.concatenate(parts).astype(np.float64)
    assert merged.count == everything.shape[0] * 9
    np.testing.assert_allclose(merged.mean, everything.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(merged.std, everything.std(axis=(0, 2, 3)), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ store


FACTS = ModelFacts(
    name="test",
    spec="random:test",
    random_weights=True,
    config_digest="abc",
    patch_size=16,
    latent_channels=2,
    embedding_dim=None,
)


def _manifest(size: int = 32, precision: str = "fp32") -> dict:
    spec = PipelineSpec("random:test", precision=precision, preprocessing=Preprocessing(size))
    return build_manifest(spec, FACTS, flip=False, latent_dtype="float32")


def _rows(manifest: dict, paths: list[str], value: float = 1.0) -> pa.Table:
    schema = row_schema(manifest)
    n = len(paths)
    latents = pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 8, value, np.float32)), 8)
    return pa.table([paths, [None] * n, [32] * n, [32] * n, latents], schema=schema)


def _errors(paths: list[str], reason: str = "empty") -> pa.Table:
    return pa.table([paths, [reason] * len(paths), ["message"] * len(paths)], schema=ERROR_SCHEMA)


def test_the_store_resumes_from_its_parts_and_rebuilds_its_views(tmp_path: Path):
    out = tmp_path / "out"
    store = LatentStore(str(out), _manifest())
    store.write_manifest(device="cpu")
    store.write_part(_rows(store.manifest, ["a", "b"], 1.0), _errors(["x"]), {"run_id": "1"})
    store.write_part(_rows(store.manifest, ["c"], 4.0), _errors([]), {"run_id": "1"})
    (out / DATA_DIR / ".part-00002.parquet.tmp").write_bytes(b"half a file")  # killed while writing

    again = LatentStore(str(out), _manifest())
    assert not (out / DATA_DIR / ".part-00002.parquet.tmp").exists()
    assert sorted(again.done_paths().to_pylist()) == ["a", "b", "c", "x"]
    assert sorted(again.done_paths(retry_errors=True).to_pylist()) == ["a", "b", "c"]
    again.write_part(_rows(again.manifest, ["x"], 4.0), _errors(["y"], "truncated"), {"run_id": "2"})
    stats = again.finalize({"run_id": "2"})

    assert sorted(p.name for p in (out / DATA_DIR).iterdir()) == [f"part-0000{i}.parquet" for i in (0, 1, 2)]
    assert pq.read_table(out / ERRORS_FILE).to_pylist() == [{"path": "y", "reason": "truncated", "error": "message"}]
    assert stats == json.loads((out / STATS_FILE).read_text())
    assert (stats["rows"], stats["errors"], stats["errors_by_reason"], stats["duplicate_rows"]) == (
        4,
        1,
        {"truncated": 1},
        0,
    )
    assert stats["latents"]["mean"] == [2.5, 2.5] and stats["latents"]["std"] == [1.5, 1.5]
    assert json.loads((out / MANIFEST_FILE).read_text())["device"] == "cpu"


def test_the_store_refuses_results_made_differently_and_overwrite_starts_again(tmp_path: Path):
    out = tmp_path / "out"
    store = LatentStore(str(out), _manifest())
    store.write_manifest(device="cpu")
    store.write_part(_rows(store.manifest, ["a"]), _errors([]), {})
    with pytest.raises(OutputMismatchError, match=r"preprocessing\.size: 32 there, 64 now.*--overwrite"):
        LatentStore(str(out), _manifest(size=64))
    with pytest.raises(OutputMismatchError, match="precision"):
        LatentStore(str(out), _manifest(precision="bf16"))
    LatentStore(str(out), _manifest(), overwrite=False)  # the same settings resume; another device would too

    fresh = LatentStore(str(out), _manifest(size=64), overwrite=True)
    assert len(fresh.done_paths()) == 0 and not (out / MANIFEST_FILE).exists()
    (out / "unrelated.txt").write_text("kept")
    store = LatentStore(str(out), _manifest())
    store.write_manifest()
    store.write_part(_rows(store.manifest, ["a"]), _errors([]), {})
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(OutputMismatchError, match=r"no manifest\.json"):
        LatentStore(str(out), _manifest())
    assert (out / "unrelated.txt").read_text() == "kept"


# ------------------------------------------------------------------------------------ model and flags


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


def test_cli_flags_parse_replicas_and_resources():
    assert replicas_arg("3") == 3 and replicas_arg("1-4") == (1, 4)
    assert resources_arg("NPU") == "npu" and resources_arg('{"NPU": 1}') == {"NPU": 1}
    with pytest.raises(argparse.ArgumentTypeError):
        resources_arg("[1]")
    assert _actor_options({"NPU": 1, "CPU": 2}) == {"num_cpus": 2, "resources": {"NPU": 1}}
    assert _actor_options({"GPU": 1}) == {"num_gpus": 1}
    assert _actor_options({"num_gpus": 1}) == {"num_gpus": 1}


def test_the_command_reports_a_bad_input_in_one_line_without_starting_ray(tmp_path: Path):
    args = [str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--model", "random:vtp-small"]
    result = subprocess.run(
        [sys.executable, "-m", "vtp_ray.cli", "tokenize", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vtp-ray tokenize: error:")
    assert "no such file or directory" in result.stderr and "Traceback" not in result.stderr


def test_the_preprocess_stage_does_not_import_torch():
    # Ray Data runs preprocess_block in processes of its own, on every node: torch would add seconds and hundreds
    # of MB to each of them for nothing.
    modules = "vtp_ray.pipeline.stages, vtp_ray.pipeline.tokenize, vtp_ray.pipeline.evaluate"
    code = f"import sys, {modules}; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


def test_the_driver_reads_model_facts_without_torch():
    # The job's driver only needs the config (patch size, channels, digest); importing torch there cost seconds of
    # start-up before Ray even began.
    code = (
        "import sys; from vtp_ray.pipeline.spec import ModelFacts; "
        f"facts = ModelFacts.of({TINY!r}, 32), ModelFacts.of('random:vtp-small'); "
        "print(facts[0].patch_size, facts[1].latent_channels, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["16", "64", "False"]
