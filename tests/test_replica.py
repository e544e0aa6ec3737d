"""VTPReplica: the batch verbs on numpy that Serve and Ray Data share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

from vtp_ray import VTPReplica
from vtp_ray.normalize import normalize


@pytest.fixture(scope="module")
def replica(tiny_dir):
    return VTPReplica(str(tiny_dir), device="cpu", precision="fp32", warmup_size=64)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(3, 64, 48, 3), dtype=np.uint8)


def test_encode_is_the_model_on_normalized_images(replica, images):
    out = replica.encode(images)
    assert out.latents.dtype == np.float32 and out.latents.shape == (3, 8, 4, 3)
    assert out.clip_embedding.shape == (3, 64) and len(out) == 3
    with torch.inference_mode():
        expected = replica.model.encode(normalize(torch.from_numpy(images)))
    np.testing.assert_array_equal(out.latents, expected.latents.numpy())
    np.testing.assert_array_equal(out.clip_embedding, expected.clip_image_feature.numpy())
    np.testing.assert_allclose(np.linalg.norm(out.clip_embedding, axis=1), 1.0, rtol=1e-5)
    one = out[1]  # one image's results, as Serve hands them out
    assert one.latents.shape == (8, 4, 3) and one.clip_embedding.shape == (64,)


def test_reconstruct_equals_decode_of_encode_and_embed_equals_its_embedding(replica, images):
    out = replica.encode(images)
    recon = replica.reconstruct(images)
    assert recon.dtype == np.uint8 and recon.shape == images.shape
    np.testing.assert_array_equal(recon, replica.decode(out.latents))
    np.testing.assert_array_equal(replica.embed(images), out.clip_embedding)
    # Other float dtypes and byte orders are converted to float32; the result stays within float16 rounding.
    decoded16 = replica.decode(out.latents.astype(">f8").astype(np.float16))
    assert np.abs(decoded16.astype(int) - recon).max() <= 8


def test_a_list_of_equal_images_is_a_batch(replica, images):
    np.testing.assert_array_equal(replica.encode(list(images)).latents, replica.encode(images).latents)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros((1, 64, 64, 3), np.float32), TypeError, "uint8"),
        (np.zeros((64, 64, 3), np.uint8), ValueError, r"\(N, H, W, 3\)"),
        (np.zeros((1, 64, 64, 4), np.uint8), ValueError, r"\(N, H, W, 3\)"),
        (np.zeros((1, 60, 64, 3), np.uint8), ValueError, "multiples of 16"),
        (np.zeros((0, 64, 64, 3), np.uint8), ValueError, "multiples of 16"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)], ValueError, "share a shape"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_image_batches_are_refused(replica, bad, error, match):
    with pytest.raises(error, match=match):
        replica.encode(bad)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros((1, 4, 4, 4), np.float32), ValueError, r"\(N, 8, h, w\)"),
        (np.zeros((8, 4, 4), np.float32), ValueError, r"\(N, 8, h, w\)"),
        (np.full((1, 8, 4, 4), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((1, 8, 4, 4), np.int32), TypeError, "float"),
    ],
)
def test_bad_latents_are_refused_and_the_replica_keeps_working(replica, images, bad, error, match):
    with pytest.raises(error, match=match):
        replica.decode(bad)
    assert replica.reconstruct(images[:1]).shape == (1, 64, 48, 3)


def test_bf16_replica_stays_close_to_fp32(tiny_dir, replica, images):
    bf16 = VTPReplica(str(tiny_dir), device="cpu", precision="bf16", warmup_size=0)
    assert bf16.model.trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.model.trunk.norm.weight.dtype == torch.float32  # norms stay float32
    a, b = bf16.encode(images), replica.encode(images)
    assert rel_err(torch.from_numpy(a.latents), torch.from_numpy(b.latents)) < 2e-2
    assert a.latents.dtype == np.float32


def test_info_names_the_model_and_its_settings(replica, tiny_dir):
    info = replica.info
    assert info.random_weights is False and info.model == "vtp-tiny"
    assert info.model_spec == str(tiny_dir)
    assert info.device == "cpu" and info.precision == "fp32"
    assert len(info.config_digest) == 16 and info.to_dict()["latent_channels"] == 8


def test_unknown_precision_and_unavailable_devices_are_clear(tiny_dir):
    with pytest.raises(ValueError, match="precision"):
        VTPReplica(str(tiny_dir), device="cpu", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            VTPReplica(str(tiny_dir), device="cuda:0")
    with pytest.raises(RuntimeError, match="no NPU is usable here"):
        VTPReplica(str(tiny_dir), device="npu:0")
