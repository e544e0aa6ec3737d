"""The application's settings tree: today's flat keys and the nested groups validate to the same settings, a setting
given twice or a wrong key fails naming it, the configs of the last release still validate, and a ``user_config``
applies over the app's values key by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import FIXTURES, ROOT, TINY
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.settings import FLAT_KEYS, AppSettings, Batching, IngressConfig, merge_batching

FLAT = {
    "model": TINY,
    "image_size": 64,
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.1,
    "max_image_size": 256,
    "max_body_bytes": 300_000,
    "max_pixels": 1_000_000,
    "max_decode_batch": 6,
    "max_decode_pixels": 24_576,
    "model_wait_s": 3.0,
    "max_texts": 5,
    "max_labels": 6,
    "max_templates": 7,
    "max_text_chars": 80,
    "body_timeout_s": 9.0,
    "max_uploads_per_client": 3,
    "upload_refusal_delay_s": 0.5,
    "client_address_header": "x-forwarded-for",
    "draft_decode": True,
}
NESTED = {
    "model": TINY,
    "image_size": 64,
    "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.1},
    "limits": {
        "max_image_size": 256,
        "max_body_bytes": 300_000,
        "max_pixels": 1_000_000,
        "max_decode_batch": 6,
        "max_decode_pixels": 24_576,
        "model_wait_s": 3.0,
    },
    "text": {"max_texts": 5, "max_labels": 6, "max_templates": 7, "max_text_chars": 80},
    "uploads": {
        "body_timeout_s": 9.0,
        "max_uploads_per_client": 3,
        "refusal_delay_s": 0.5,
        "client_address_header": "x-forwarded-for",
    },
    "preprocess": {"fast": True},
}


def test_flat_keys_and_groups_validate_to_the_same_settings() -> None:
    flat, nested = AppSettings.from_args(FLAT, environ={}), AppSettings.from_args(NESTED, environ={})
    assert flat == nested
    assert flat.limits.max_decode_batch == 6 and flat.uploads.refusal_delay_s == 0.5 and flat.preprocess.fast
    mixed = {**{k: v for k, v in FLAT.items() if FLAT_KEYS.get(k, ("",))[0] != "limits"}, "limits": NESTED["limits"]}
    assert AppSettings.from_args(mixed, environ={}) == flat
    # every flat key of the last release's AppArgs has a home
    assert set(FLAT) - {"model", "image_size"} <= set(FLAT_KEYS)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            {"max_body_bytes": 5, "limits": {"max_body_bytes": 6}},
            "args.limits.max_body_bytes and as args.max_body_bytes",
        ),
        ({"draft_decode": True, "fast_preprocess": False}, "args.fast_preprocess and as args.draft_decode"),
        ({"max_batch_size": 2, "batching": {"max_batch_size": 3}}, "batching.max_batch_size is given twice"),
        ({"limits": {"max_body_byte": 1}}, "limits.max_body_byte"),
        ({"max_bodybytes": 1}, "max_bodybytes"),
        ({"image_size": 100}, "image_size must be a multiple of 16"),
        ({"max_batch_size": 0}, "batching.max_batch_size"),
        ({"batch_wait_timeout_s": -1}, "batching.batch_wait_timeout_s"),
        ({"image_size": 2048}, "larger than limits.max_image_size"),
        ({"colour": 1}, "colour"),
    ],
)
def test_a_wrong_or_repeated_setting_fails_naming_it(args: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        AppSettings.from_args({"model": TINY, **args}, environ={})
    assert named in str(refused.value)


def test_the_last_release_configs_validate_unchanged() -> None:
    """serve_config.yaml as released before the settings tree (tests/fixtures/releases) and today's, with the same
    deployment names under ``deployments:``."""
    for path in (FIXTURES / "releases" / "serve_config-0.1.0.yaml", ROOT / "serve_config.yaml"):
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for app in config.applications:
            settings = AppSettings.from_args(app.args, environ={})
            assert {d.name for d in app.deployments} <= {"VTPReplica", "VTPIngress"}
            for deployment in app.deployments:
                if not isinstance(deployment.user_config, dict):  # unset
                    continue
                if deployment.name == "VTPReplica":
                    merge_batching(settings.batching, deployment.user_config)
                else:
                    settings.ingress_config().merged(deployment.user_config)


def test_a_user_config_applies_over_the_app_values_key_by_key() -> None:
    settings = AppSettings.from_args(NESTED, environ={})
    live = settings.ingress_config().merged({"limits": {"max_body_bytes": 1000}, "uploads": {"refusal_delay_s": 2}})
    assert live.limits.max_body_bytes == 1000 and live.limits.max_decode_batch == 6  # the rest: the app's
    assert live.uploads.refusal_delay_s == 2 and live.uploads.max_uploads_per_client == 3
    assert live.text == settings.text
    with pytest.raises(ValidationError, match=r"limits\.nope"):
        settings.ingress_config().merged({"limits": {"nope": 1}})
    assert merge_batching(settings.batching, {"max_batch_size": 9}) == Batching(
        max_batch_size=9, batch_wait_timeout_s=0.1
    )
    assert IngressConfig().merged(None) == IngressConfig()


def test_env_vars_override_args() -> None:
    env = {"VTP_MODEL": "random:vtp-small", "VTP_PRECISION": "bf16", "VTP_DEVICE": "cpu", "VTP_API_KEY": "s3cret-key"}
    settings = AppSettings.from_args({"model": TINY, "precision": "fp32"}, environ=env)
    assert (settings.model, settings.precision, settings.device) == ("random:vtp-small", "bf16", "cpu")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret" not in repr(settings)
    assert AppSettings.from_args({"model": TINY}, environ={}).api_key is None


def test_model_names_in_the_config() -> None:
    settings = AppSettings(model="a", models={"wide": "/ckpt/wide"})
    assert settings.checkpoints() == {"vtp": "a", "wide": "/ckpt/wide"}
    for bad in ({"models": {"a.b": "x"}}, {"models": {"vtp": "x"}}, {"model_name": "-x"}):
        with pytest.raises(ValidationError):
            AppSettings(model="a", **bad)
    assert json.loads(AppSettings(model="a").model_dump_json())["limits"]["model_wait_s"] == 10.0


def test_the_shipped_config_puts_batching_in_one_place() -> None:
    """``max_batch_size`` lives in the model deployment's user_config only (not also in args)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for app in config["applications"]:
        assert not {"max_batch_size", "batching"} & set(app["args"])
        (model,) = [d for d in app["deployments"] if d["name"] == "VTPReplica"]
        assert set(model["user_config"]) == set(Batching.model_fields)
    assert Path(ROOT / "serve_config.yaml").exists()
