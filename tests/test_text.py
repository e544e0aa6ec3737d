"""The CLIP text side in process: tokenizer ids against upstream's, text embeddings and zero-shot logits against
upstream's outputs on the tinytext fixture (the real 49408-id vocabulary), classifier building, template checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINYTEXT, TOKENS, random_image
from safetensors.torch import load_file

from vtp_ray import VTPReplica
from vtp_ray.text import check_templates, expand
from vtp_ray.text.classifier import class_embeddings
from vtp_ray.text.imagenet import imagenet_classnames, imagenet_templates, resolve_template_set
from vtp_ray.text.tokenizer import tokenize

CASES = json.loads(TOKENS.read_text())["cases"]
TEXTS = [case["text"] for case in CASES]


@pytest.fixture(scope="module")
def replica() -> VTPReplica:
    return VTPReplica(TINYTEXT, device="cpu", warmup_size=0)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(f"{TINYTEXT}/reference.safetensors")


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:30] for c in CASES])
def test_tokenizer_matches_upstream_ids(case: dict) -> None:
    ids = tokenize([case["text"]], 77)[0]
    assert ids.dtype == np.int64 and ids.shape == (77,)
    n = len(case["ids"])
    assert ids[:n].tolist() == case["ids"] and not ids[n:].any()


def test_tokenizer_cuts_long_text_to_end_token() -> None:
    ids = tokenize(["word " * 200], 77)[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids != 0).all()


def test_tokenizer_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="strings"):
        tokenize(["ok", 3], 77)  # type: ignore[list-item]


def test_ids_equal_the_fixture_reference(ref: dict[str, torch.Tensor]) -> None:
    assert np.array_equal(tokenize(TEXTS, 77), ref["tok.ids"].numpy())


def test_embed_text_matches_upstream(replica: VTPReplica, ref: dict[str, torch.Tensor]) -> None:
    embeddings = replica.embed_text(TEXTS)
    assert embeddings.shape == (20, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embeddings, ref["tok.clip_text_feature"].numpy(), atol=2e-5)


def test_embed_text_is_independent_of_batch_company(replica: VTPReplica) -> None:
    together = replica.embed_text(TEXTS[:6])
    alone = np.concatenate([replica.embed_text([t]) for t in TEXTS[:6]])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert replica.embed_text([]).shape == (0, 32)


def test_zero_shot_logits_match_upstream(replica: VTPReplica, ref: dict[str, torch.Tensor]) -> None:
    image_features = ref["s0.clip_image_feature"].numpy()
    result = replica.zero_shot(image_features, replica.embed_text(TEXTS))
    assert result.activation == "softmax" and replica.info.zero_shot_activation == "softmax"
    np.testing.assert_allclose(result.logits, ref["tok.logits_s0"].numpy(), rtol=1e-4, atol=1e-3)
    expected = torch.from_numpy(result.logits).softmax(-1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5, atol=1e-7)
    indices, probabilities = result.top(3)
    assert indices.shape == (2, 3) and (np.diff(probabilities, axis=1) <= 0).all()
    assert indices[0, 0] == int(np.argmax(result.logits[0]))


def test_zero_shot_is_sigmoid_with_a_logit_bias() -> None:
    replica = VTPReplica(TINYTEXT, device="cpu", warmup_size=0)
    replica.model.logit_bias = torch.nn.Parameter(torch.tensor(-3.0))
    replica.info = type(replica.info)(**{**replica.info.to_dict(), "zero_shot_activation": "sigmoid"})
    images = replica.embed(random_image(64, 64)[None])
    result = replica.zero_shot(images, replica.embed_text(["a", "b", "c"]))
    scale = replica.model.logit_scale.exp().item()
    cos = images @ replica.embed_text(["a", "b", "c"]).T
    np.testing.assert_allclose(result.logits, scale * cos - 3.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.probabilities, 1 / (1 + np.exp(-result.logits)), rtol=1e-5)
    assert result.activation == "sigmoid"


def test_classify_is_embed_then_zero_shot(replica: VTPReplica) -> None:
    images = np.stack([random_image(64, 64, seed=s) for s in range(3)])
    classes = replica.embed_text(["a cat", "a dog"])
    direct = replica.classify(images, classes)
    staged = replica.zero_shot(replica.embed(images), classes)
    np.testing.assert_allclose(direct.probabilities, staged.probabilities, rtol=1e-5)
    np.testing.assert_allclose(direct.probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_class_embeddings_average_the_templates(replica: VTPReplica) -> None:
    templates = ("a photo of a {}.", "a drawing of a {}.", "{}")
    built = class_embeddings(replica.embed_text, ["cat", "dog", "car"], templates, classes_per_call=2)
    for row, name in zip(built, ["cat", "dog", "car"], strict=True):
        mean = replica.embed_text([t.format(name) for t in templates]).mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_templates() -> None:
    assert expand(["cat", "dog"], ("a {}", "{}!")) == ["a cat", "cat!", "a dog", "dog!"]
    for bad in ([], ["no placeholder"], ["{} and {}"], [3]):
        with pytest.raises(ValueError):
            check_templates(bad)
    assert resolve_template_set("default") == ("a photo of a {}.",)
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_template_set("nope")


def test_imagenet_data() -> None:
    names, templates = imagenet_classnames(), imagenet_templates()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}." and check_templates(templates)
    assert resolve_template_set("imagenet") == templates
