"""The adapted VTP model against upstream's outputs (fixtures), its loader and its config options."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from vtp_ray.model import CheckpointError, VTPConfig, VTPModel, load_model
from vtp_ray.model.checkpoint import init_random_weights

TOL = 2e-5


@pytest.fixture(scope="module")
def upstream_mode(tiny_dir):
    return load_model(str(tiny_dir), rope_dtype="bfloat16").model


@pytest.fixture(scope="module")
def portable_mode(tiny_dir):
    return load_model(str(tiny_dir), rope_dtype="float32").model


@pytest.mark.parametrize("s", ["s0", "s1"])
@torch.no_grad()
def test_bfloat16_rope_reproduces_every_upstream_output(upstream_mode, reference, s):
    m, x = upstream_mode, reference[f"{s}.image"]
    outputs = {
        "clip_image_feature": m.get_clip_image_feature(x),
        "clip_image_feature_raw": m.get_clip_image_feature(x, normalize=False),
        "latents": m.get_reconstruction_latents(x),
        "decoded": m.get_latents_decoded_images(reference[f"{s}.latents"]),
    }
    last = m.get_last_layer_feature(x)
    outputs["cls_token"], outputs["patch_tokens"] = last["cls_token"], last["patch_tokens"]
    for j, (patches, cls) in enumerate(m.get_intermediate_layers_feature(x, n=2, return_class_token=True)):
        outputs[f"intermediate{j}.patch_tokens"], outputs[f"intermediate{j}.cls_token"] = patches, cls
    for key, value in outputs.items():
        expected = reference[f"{s}.{key}"]
        assert value.shape == expected.shape, key
        assert rel_err(value, expected) < TOL, key


@torch.no_grad()
def test_text_tower_and_logits_match_upstream(upstream_mode, reference):
    m = upstream_mode
    assert rel_err(m.get_clip_text_feature(reference["text.ids"]), reference["text.clip_text_feature"]) < TOL
    logits, logits_t = m.get_clip_logits(reference["s0.image"], reference["text.ids"])
    assert rel_err(logits, reference["text.logits_s0"]) < TOL
    assert torch.equal(logits.T, logits_t)


@torch.no_grad()
def test_float32_rope_matches_the_portable_reference_and_differs_from_upstream(portable_mode, upstream_mode, reference):
    x = reference["s0.image"]
    latents = portable_mode.get_reconstruction_latents(x)
    assert rel_err(portable_mode.get_clip_image_feature(x), reference["s0.rope_fp32.clip_image_feature"]) < TOL
    assert rel_err(latents, reference["s0.rope_fp32.latents"]) < TOL
    decoded = portable_mode.get_latents_decoded_images(reference["s0.rope_fp32.latents"])
    assert rel_err(decoded, reference["s0.rope_fp32.decoded"]) < TOL
    # The tolerance tells the two RoPE modes apart: each mode misses the other's reference.
    assert rel_err(latents, reference["s0.latents"]) > TOL
    assert rel_err(upstream_mode.get_reconstruction_latents(x), reference["s0.rope_fp32.latents"]) > TOL


@torch.no_grad()
def test_encode_runs_the_trunk_once_and_agrees_with_the_single_purpose_methods(portable_mode, reference):
    x = reference["s1.image"]
    calls = []
    handle = portable_mode.trunk.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = portable_mode.encode(x)
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(out.latents, portable_mode.get_reconstruction_latents(x), rtol=0, atol=0)
    torch.testing.assert_close(out.clip_image_feature, portable_mode.get_clip_image_feature(x), rtol=0, atol=0)
    assert out.latents.shape == (1, 8, 3, 5)


@pytest.mark.parametrize("shape", [(1, 3, 40, 64), (1, 3, 64, 8), (3, 64, 64), (1, 1, 64, 64)])
def test_bad_image_shapes_are_rejected_with_a_clear_error(portable_mode, shape):
    with pytest.raises(ValueError, match=r"multiples of 16|shape \(B, 3, H, W\)"):
        portable_mode.encode(torch.zeros(shape))


def test_bad_latent_shapes_are_rejected(portable_mode):
    with pytest.raises(ValueError, match=r"latents of shape \(B, 8, h, w\)"):
        portable_mode.decode(torch.zeros(1, 4, 4, 4))


# ------------------------------------------------------------------------------------------ loading


def _copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    ckpt = _copy_checkpoint(tiny_dir, tmp_path / "m", edit_tensors=lambda t: t.pop("trunk.blocks.1.mlp.w3.bias"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): trunk\.blocks\.1\.mlp\.w3\.bias"):
        load_model(str(ckpt))


def test_unexpected_and_misshapen_tensors_are_named(tiny_dir, tmp_path):
    def edit(t):
        t["trunk.extra_thing"] = torch.zeros(2)
        t["visual_proj.weight"] = torch.zeros(3, 3)

    ckpt = _copy_checkpoint(tiny_dir, tmp_path / "m", edit_tensors=edit)
    with pytest.raises(CheckpointError) as err:
        load_model(str(ckpt))
    assert "unexpected (1): trunk.extra_thing" in str(err.value)
    assert "visual_proj.weight: checkpoint (3, 3) vs model (64, 64)" in str(err.value)


def test_corrupt_safetensors_is_a_checkpoint_error(tiny_dir, tmp_path):
    ckpt = _copy_checkpoint(tiny_dir, tmp_path / "m")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(str(ckpt))


def test_transformers4_torch_dtype_key_and_sharded_index_load(tiny_dir, tmp_path, reference):
    def to_v4(cfg):
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["transformers_version"] = "4.57.1"

    ckpt = _copy_checkpoint(tiny_dir, tmp_path / "m", edit_config=to_v4)
    tensors = load_file(str(ckpt / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, str(ckpt / name))
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    model = load_model(str(ckpt), rope_dtype="bfloat16").model
    with torch.no_grad():
        assert rel_err(model.get_reconstruction_latents(reference["s0.image"]), reference["s0.latents"]) < TOL


def test_missing_path_says_how_to_get_weights(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(str(tmp_path / "VTP-Small-f16d64"))
    assert "does not exist" in str(err.value)
    assert "MiniMaxAI/VTP-Small-f16d64" in str(err.value)
    assert "random:vtp-small" in str(err.value)


@pytest.fixture(scope="module")
def vtp_small():
    """The 167M-parameter VTP-Small with seeded random weights, built once."""
    return load_model("random:vtp-small")


@pytest.mark.slow
def test_random_vtp_small_has_the_published_size_and_is_labelled(vtp_small):
    assert vtp_small.random_weights and "random" in vtp_small.name
    assert sum(p.numel() for p in vtp_small.model.parameters()) == 167_177_857


def test_random_weights_are_seeded(tiny_dir):
    # The same code path as random:vtp-small (a config, then init_random_weights), at the tiny model's size.
    spec = f"random:{tiny_dir / 'config.json'}"
    first, again = load_model(spec), load_model(spec)
    assert first.random_weights
    pairs = zip(first.model.state_dict().items(), again.model.state_dict().items(), strict=True)
    assert all(name == other and torch.equal(a, b) for (name, a), (other, b) in pairs)


def test_unknown_random_preset_and_rope_dtype_are_errors():
    with pytest.raises(ValueError, match="unknown random model"):
        load_model("random:vtp-huge")
    with pytest.raises(ValueError, match="rope_dtype"):
        load_model("random:vtp-small", rope_dtype="float16")


def test_config_round_trip_and_validation(tiny_dir):
    cfg = VTPConfig.from_json_file(tiny_dir / "config.json")
    assert VTPConfig.from_dict(cfg.to_dict()) == cfg
    assert VTPConfig.from_dict({**cfg.to_dict(), "new_upstream_field": 1}).extra == {"new_upstream_field": 1}
    with pytest.raises(ValueError, match="vision_ffn_layer"):
        VTPConfig.from_dict({**cfg.to_dict(), "vision_ffn_layer": "geglu"})
    with pytest.raises(ValueError, match="model_type"):
        VTPConfig.from_dict({**cfg.to_dict(), "model_type": "clip"})


# -------------------------------------------------------------------------------- config options


def _tiny_config(**overrides) -> VTPConfig:
    base = dict(
        image_size=32, vision_embed_dim=32, vision_depth=2, vision_num_heads=2, vision_feature_bottleneck=8,
        text_context_length=8, text_vocab_size=64, text_embed_dim=32, text_num_heads=2, text_depth=1,
        decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1,
    )  # fmt: skip
    return VTPConfig(**{**base, **overrides})


def _random_model(**overrides) -> VTPModel:
    model = VTPModel(_tiny_config(**overrides)).eval()
    init_random_weights(model, seed=1)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {"vision_norm_layer": "layernorm", "decoder_norm_layer": "rmsnorm"},
        {"vision_norm_layer": "layernormbf16", "decoder_norm_layer": "layernormbf16"},
        {"vision_ffn_layer": "mlp", "decoder_ffn_layer": "swiglu128"},
        {"vision_ffn_layer": "swiglu32", "decoder_ffn_layer": "swiglu64"},
        {"vision_use_qk_norm": True, "decoder_use_qk_norm": True},
        {"vision_init_values": 0.1, "decoder_init_values": 0.1, "text_ls_init_value": 0.1},
        {"text_quick_gelu": True, "text_pool_type": "last", "text_proj_bias": True},
        {"text_pool_type": "first", "text_proj_type": "none", "nonscalar_logit_scale": True, "init_logit_bias": -10.0},
        {"text_embed_cls": True},
    ],
)
@torch.no_grad()
def test_every_config_option_builds_and_runs(overrides):
    model = _random_model(**overrides)
    image = torch.randn(2, 3, 32, 48)
    out = model.encode(image)
    assert out.latents.shape == (2, 8, 2, 3)
    assert model.decode(out.latents).shape == (2, 3, 32, 48)
    ids = torch.randint(1, 63, (3, 8))
    logits, _ = model.get_clip_logits(image, ids)
    assert logits.shape == (2, 3)
    for t in (out.latents, out.clip_image_feature, logits):
        assert torch.isfinite(t).all()
    # Every parameter the config implies is one the state dict carries, and a reload is exact.
    clone = VTPModel(model.config).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(clone.encode(image).latents, out.latents)


def test_swiglu_widths_follow_the_alignment():
    model = _random_model(vision_ffn_layer="swiglu64", decoder_ffn_layer="swiglu")
    # int(32 * 4 * 2/3) = 85 -> 128 with 64-alignment, 88 with the default 8.
    assert model.trunk.blocks[0].mlp.w1.out_features == 128
    assert model.pixel_decoder.blocks[0].mlp.w1.out_features == 88


@torch.no_grad()
def test_clip_feature_options_select_the_documented_token():
    image = torch.randn(1, 3, 32, 32)
    pooled = _random_model(vision_clip_feat="pooled")
    tokens = pooled.get_last_layer_feature(image)["patch_tokens"]
    expected = pooled.visual_proj(tokens.mean(dim=1))
    torch.testing.assert_close(pooled.get_clip_image_feature(image, normalize=False), expected)

    through_bottleneck = _random_model(vision_bottleneck_ae_only=False)
    assert through_bottleneck.visual_proj.in_features == 8
    cls = through_bottleneck.get_last_layer_feature(image, use_bottleneck=True)["cls_token"]
    torch.testing.assert_close(
        through_bottleneck.get_clip_image_feature(image, normalize=False), through_bottleneck.visual_proj(cls)
    )


@torch.no_grad()
def test_causal_mask_hides_later_tokens_unless_disabled():
    ids = torch.randint(1, 60, (1, 8))
    changed = ids.clone()
    changed[0, -1] = 63
    causal = _random_model(text_pool_type="first")
    assert torch.allclose(causal.get_clip_text_feature(ids), causal.get_clip_text_feature(changed))
    bidirectional = _random_model(text_pool_type="first", text_no_causal_mask=True)
    assert not torch.allclose(bidirectional.get_clip_text_feature(ids), bidirectional.get_clip_text_feature(changed))


@torch.no_grad()
def test_intermediate_layers_options(portable_mode, reference):
    x = reference["s0.image"]
    (reshaped,) = portable_mode.get_intermediate_layers_feature(x, n=[1], reshape=True)
    assert reshaped.shape == (2, 64, 4, 4)
    (last,) = portable_mode.get_intermediate_layers_feature(x, n=1)
    torch.testing.assert_close(last, portable_mode.get_last_layer_feature(x)["patch_tokens"])
    (raw,) = portable_mode.get_intermediate_layers_feature(x, n=1, norm=False)
    assert not torch.allclose(raw, last)


def test_rope_tables_cached_under_inference_mode_serve_autograd_later(tiny_dir, reference):
    model = load_model(str(tiny_dir)).model
    x = reference["s0.image"]
    with torch.inference_mode():
        expected = model.get_reconstruction_latents(x)
    image = x.clone().requires_grad_(True)
    latents = model.get_reconstruction_latents(image)
    latents.sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    torch.testing.assert_close(latents.detach(), expected)


@pytest.mark.slow  # a subprocess
def test_an_eager_replica_never_imports_torch_dynamo(tiny_dir):
    # Replica start-up time (every actor and Serve replica): importing torch._dynamo costs ~1 s of CPU, and it came
    # in twice unasked: nn.Embedding's default init on the meta device, and the compile module's import.
    load = (
        "import numpy as np; from vtp_ray import VTPReplica; "
        f"r = VTPReplica({str(tiny_dir)!r}, 'cpu', warmup_size=64); r.reconstruct(np.zeros((2, 64, 64, 3), np.uint8))"
    )
    code = f"import sys; {load}; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
