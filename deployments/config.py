"""The application arguments (``applications[].args`` in serve_config.yaml), with env var overrides."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from vtp_ray.images import PATCH_SIZE
from vtp_ray.options import PRECISIONS

#: Env vars that win over the config file, so one config serves many models and machines.
ENV_OVERRIDES: Mapping[str, str] = {
    "model": "VTP_MODEL",
    "precision": "VTP_PRECISION",
    "device": "VTP_DEVICE",
    "api_key": "VTP_API_KEY",
}


#: Model names: path segments of the OIP routes and values of ``?model=`` (no ``.``: OIP names are ``<model>.<verb>``).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class AppArgs(BaseModel):
    """Validated application arguments; see serve_config.yaml for what each one does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="checkpoint directory, or random:vtp-small (required)")
    precision: Literal[PRECISIONS] = "fp32"
    device: str | None = Field(None, description="default: the accelerator Ray assigns each replica, else the CPU")
    placement: str | dict[str, Any] = Field(
        "auto", description="auto, npu, gpu, cpu or Ray actor options; a config's ray_actor_options overrides it"
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="initial batching; live: the deployment's user_config")
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=60.0, description="initial; live: user_config")
    image_size: int = Field(256, ge=PATCH_SIZE, le=4096, description="default side of the square model input")
    max_image_size: int = Field(1024, ge=PATCH_SIZE, le=8192, description="largest ?size= and decoded side")
    max_body_bytes: int = Field(16 * 2**20, gt=0)
    max_pixels: int = Field(40_000_000, gt=0, description="largest uploaded image, in pixels")
    max_decode_batch: int = Field(64, ge=1, le=4096, description="most latents one /v1/decode request may hold")
    max_decode_pixels: int = Field(
        16_777_216, gt=0, description="most output pixels one /v1/decode request may ask for (N x H x W)"
    )
    api_key: SecretStr | None = None
    model_name: str = Field("vtp", description="the name requests use for `model` (the default model)")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="more checkpoints served beside `model`, by name: one model deployment each (VTPReplica-<name>)",
    )
    model_wait_s: float = Field(
        10.0, ge=0.0, le=600.0, description="how long a request waits for a model replica before a 503"
    )

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_model_name(value)

    @field_validator("models")
    @classmethod
    def _valid_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, spec in value.items():
            _check_model_name(name)
            if not spec:
                raise ValueError(f"models.{name}: empty checkpoint")
        return value

    max_texts: int = Field(256, ge=1, le=100_000, description="texts per /v1/embed-text request at most")
    max_labels: int = Field(256, ge=1, le=100_000, description="labels per /v1/classify request at most")
    max_templates: int = Field(100, ge=1, le=1000, description="prompt templates per /v1/classify request at most")
    max_text_chars: int = Field(10_000, ge=1, description="characters per text, label or template at most")
    label_cache_size: int = Field(64, ge=1, le=100_000, description="label sets whose text embeddings a replica keeps")
    draft_decode: bool = Field(
        False, description="decode JPEGs at reduced scale where the crop allows (?decode= overrides per request)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="seconds a client has to deliver a whole request body (408 after)"
    )
    max_uploads_per_client: int = Field(
        32, ge=0, description="request bodies one client address may be sending at once (429 past it); 0: no cap"
    )
    upload_refusal_delay_s: float = Field(
        5.0, ge=0, le=60, description="a body past max_uploads_per_client is answered 429 after this pause"
    )
    client_address_header: str | None = Field(
        None, description="header whose last entry is the client address (set by a trusted load balancer)"
    )

    @field_validator("image_size", "max_image_size")
    @classmethod
    def _multiple_of_patch(cls, value: int, info: ValidationInfo) -> int:
        if value % PATCH_SIZE:
            raise ValueError(f"{info.field_name} must be a multiple of {PATCH_SIZE}, got {value}")
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return value or None

    @model_validator(mode="after")
    def _sizes_agree(self) -> AppArgs:
        if self.image_size > self.max_image_size:
            raise ValueError(f"image_size {self.image_size} is larger than max_image_size {self.max_image_size}")
        if self.model_name in self.models:
            raise ValueError(f"models.{self.model_name} clashes with model_name, the default model's name")
        return self

    def checkpoints(self) -> dict[str, str]:
        """Every served model by name, the default first."""
        return {self.model_name: self.model, **self.models}

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ) -> AppArgs:
        """Validate the config's ``args``, after the ``VTP_*`` env vars that are set replace their fields."""
        merged = dict(args or {})
        for field, var in ENV_OVERRIDES.items():
            if environ.get(var):
                merged[field] = environ[var]
        return cls.model_validate(merged)


def _check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_' and '-' (at most 63, no leading '-' or '_')")
    return name
