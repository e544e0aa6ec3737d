"""The tokenize output directory without Ray: parts written atomically, resumed from, refused when made differently,
latent statistics that merge exactly, and LightningDiT's shard layout through the store's extension points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from vtp_ray.pipeline import ModelFacts, PipelineSpec, Preprocessing
from vtp_ray.pipeline.jobs.lightningdit import ShardStore, lightningdit_manifest
from vtp_ray.pipeline.jobs.tokenize import build_manifest
from vtp_ray.pipeline.latent_stats import ChannelStats
from vtp_ray.pipeline.store import (
    DATA_DIR,
    ERROR_SCHEMA,
    ERRORS_FILE,
    MANIFEST_FILE,
    STATS_FILE,
    LatentStore,
    OutputMismatchError,
    row_schema,
)


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


def _shard_rows(manifest: dict, paths: list[str], labels: list[str], value: float) -> pa.Table:
    n = len(paths)

    def latents(v: float) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 8, v, np.float32)), 8)

    return pa.table([paths, labels, [32] * n, [32] * n, latents(value), latents(-value)], schema=row_schema(manifest))


def test_the_shard_layout_resumes_through_the_stores_extension_points_and_overwrite_clears_it(tmp_path: Path):
    spec = PipelineSpec("random:test", preprocessing=Preprocessing(32))
    manifest = lightningdit_manifest(build_manifest(spec, FACTS, flip=True, latent_dtype="float32"), ["cat", "dog"])
    out = tmp_path / "shards"
    store = ShardStore(str(out), manifest)
    store.write_manifest(device="cpu")
    store.write_part(_shard_rows(store.manifest, ["a", "b"], ["dog", "cat"], 1.0), _errors(["x"]), {"run_id": "1"})
    store.write_part(_shard_rows(store.manifest, ["c"], ["cat"], 4.0), _errors([]), {"run_id": "1"})
    store.finalize({"run_id": "1"})
    (out / ".latents_rank00_shard002.safetensors.tmp").write_bytes(b"half a shard")  # killed while writing
    shards = ["latents_rank00_shard000.safetensors", "latents_rank00_shard001.safetensors"]
    layout = ["_errors", "classes.txt", "errors.parquet", "latents_stats.pt", "manifest.json", "stats.json"]
    assert load_file(out / shards[0])["labels"].tolist() == [1, 0]  # indices in the manifest's classes

    again = ShardStore(str(out), manifest)  # the parts are read back from the shards' headers alone
    assert not (out / ".latents_rank00_shard002.safetensors.tmp").exists()
    assert sorted(again.done_paths().to_pylist()) == ["a", "b", "c", "x"]
    stats = again.latent_stats()
    assert stats.count == 3 * 4 and stats.mean.tolist() == [2.0, 2.0]
    again.write_part(_shard_rows(again.manifest, ["x"], ["dog"], 2.0), _errors([]), {"run_id": "2"})
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "latents_rank00_shard002.safetensors", *layout])

    (out / "unrelated.txt").write_text("kept")
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(OutputMismatchError, match=r"no manifest\.json"):
        ShardStore(str(out), manifest)
    ShardStore(str(out), manifest, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["unrelated.txt"]
