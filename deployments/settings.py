"""The application's settings: one typed tree, validated once, each deployment handed only its own part.

``applications[].args`` in serve_config.yaml validates into ``AppSettings``. Serve folds an application's ``args``
into its code version, so changing any of them restarts every replica (the weights are loaded again); only a
deployment's ``user_config`` changes apply live, through ``reconfigure``. The tree says which is which:

| group | what | lives in | a change |
|---|---|---|---|
| (top level) | checkpoint, precision, device, placement, names, input size, API key | ``args`` | restarts the app |
| ``batching`` | batch size and wait, the batch work's minimum share | each model deployment's ``user_config`` | live |
| ``limits`` | request sizes, decode limits, ``model_wait_s`` | the ingress's ``user_config`` | live |
| ``text`` | texts, labels, templates per request | the ingress's ``user_config`` | live |
| ``uploads`` | body deadline, per-client upload cap | the ingress's ``user_config`` | live |
| ``preprocess`` | ``fast`` (JPEG draft mode) | the ingress's ``user_config`` | live |
| ``rate_limits`` | per-client budgets (model and cheap routes) | the ingress's ``user_config`` | live |
| ``keys`` | named API keys (SHA-256 digests, a key file) | the ingress's ``user_config`` | live |

The groups given in ``args`` are the initial values the builder puts into each deployment's ``user_config``; a
config's ``deployments: [{name: VTPIngress, user_config: {limits: {...}}}]`` (or ``VTPReplica``'s ``batching``
keys) overrides them per group and key, and ``serve deploy`` with a new ``user_config`` reconfigures the running
replicas without reloading weights. Every key of the earlier flat ``args`` (``max_body_bytes``,
``upload_refusal_delay_s``, ``draft_decode``...) is still accepted where it was; the same setting given both flat and
nested is an error naming it. ``VTP_MODEL``, ``VTP_PRECISION``, ``VTP_DEVICE`` and ``VTP_API_KEY`` override theirs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from vtp_ray.images import PATCH_SIZE
from vtp_ray.options import COMPILE_MODES, PRECISIONS

__all__ = [
    "ENV_OVERRIDES",
    "FLAT_KEYS",
    "AppSettings",
    "Batching",
    "Budget",
    "IngressConfig",
    "Keys",
    "Limits",
    "NamedKey",
    "Preprocess",
    "RateLimits",
    "TextLimits",
    "Uploads",
]

#: Env vars that win over the config file, so one config serves many models and machines.
ENV_OVERRIDES: Mapping[str, str] = {
    "model": "VTP_MODEL",
    "precision": "VTP_PRECISION",
    "device": "VTP_DEVICE",
    "api_key": "VTP_API_KEY",
}

#: Model names: path segments of the OIP routes and values of ``?model=`` (no ``.``: OIP names are ``<model>.<verb>``).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(_Group):
    """The model deployment's live settings: how requests share model calls."""

    max_batch_size: int = Field(8, ge=1, le=1024, description="requests per model call at most")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, le=60.0, description="how long the first request of a batch waits for company"
    )
    batch_min_share: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="the share of model time batch work (jobs on the app) gets while online requests saturate the "
        "replica; online requests go first otherwise",
    )
    batch_work_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="inputs per model call of batch work (jobs on the app) at most while online requests come; "
        "none: max_batch_size. An online request that arrives waits for at most one such call: smaller shortens that "
        "wait, larger fills the device better",
    )
    batch_work_max_ms: float = Field(
        250.0,
        ge=0.0,
        le=60_000.0,
        description="the longest a model call of batch work should take: where batch_work_size inputs (or the "
        "grown calls' inputs) would take longer at the time per input the batch calls have been taking, they take "
        "fewer (at least one), so that an online request that arrives waits about this long at most; 0: no bound",
    )
    batch_idle_work_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="inputs per model call of batch work at most while no online request comes: the calls double "
        "from batch_work_size up to this, once none came for 1 s, while each takes under 50 ms, and drop back at the "
        "next online request; none: 4 x batch_work_size (at most 1024). Equal to batch_work_size: no growth",
    )

    @model_validator(mode="after")
    def _idle_calls_not_smaller(self) -> Batching:
        if self.batch_idle_work_size is not None and self.batch_idle_work_size < self.call_size(batch_work=True):
            raise ValueError(
                f"batch_idle_work_size ({self.batch_idle_work_size}) must be at least batch_work_size (or "
                f"max_batch_size): {self.call_size(batch_work=True)}"
            )
        return self

    def call_size(self, batch_work: bool) -> int:
        """The most inputs one model call of online requests (or, ``batch_work``, of a job's inputs while online
        requests come) takes."""
        return (self.batch_work_size or self.max_batch_size) if batch_work else self.max_batch_size

    @property
    def idle_call_size(self) -> int:
        """The most inputs one model call of a job's inputs takes while no online request comes."""
        return self.batch_idle_work_size or min(1024, 4 * self.call_size(batch_work=True))

    @property
    def largest_call(self) -> int:
        """The most inputs any model call takes (what a compiling replica compiles for)."""
        return max(self.max_batch_size, self.idle_call_size)


class Limits(_Group):
    """What one request may ask for, and how long it waits for a model replica."""

    max_image_size: int = Field(
        1024, ge=PATCH_SIZE, le=8192, description="largest ?size=, and largest side a decode may produce"
    )
    max_body_bytes: int = Field(16 * 2**20, gt=0, description="request bodies over this are refused (413)")
    max_pixels: int = Field(40_000_000, gt=0, description="largest uploaded image, in pixels")
    max_decode_batch: int = Field(64, ge=1, le=4096, description="latents per decode request at most")
    max_decode_pixels: int = Field(
        16_777_216, gt=0, description="output pixels one decode request may ask for at most (N x H x W)"
    )
    model_wait_s: float = Field(
        10.0, ge=0.0, le=600.0, description="how long a request waits for a model replica before a 503"
    )

    @field_validator("max_image_size")
    @classmethod
    def _multiple_of_patch(cls, value: int) -> int:
        return _check_patch_multiple("max_image_size", value)


class TextLimits(_Group):
    """How many texts, labels and templates one request may carry, and how long each may be."""

    max_texts: int = Field(256, ge=1, le=100_000, description="texts per embed-text request at most")
    max_labels: int = Field(256, ge=1, le=100_000, description="labels per classify request at most")
    max_templates: int = Field(100, ge=1, le=1000, description="prompt templates per classify request at most")
    max_text_chars: int = Field(10_000, ge=1, description="characters per text, label or template at most")


class Uploads(_Group):
    """How request bodies may arrive (``api.uploads.UploadGuard``)."""

    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="seconds a client has to deliver a whole request body (408 after)"
    )
    max_uploads_per_client: int = Field(
        32, ge=0, description="request bodies one client address may be sending at once (429 past it); 0: no cap"
    )
    refusal_delay_s: float = Field(
        5.0, ge=0, le=60, description="a body past max_uploads_per_client is answered 429 after this pause"
    )
    client_address_header: str | None = Field(
        None, description="header whose last entry is the client address (set by a trusted load balancer)"
    )


class Preprocess(_Group):
    """How uploaded images become model inputs."""

    fast: bool = Field(
        False, description="load JPEGs at a reduced scale where the crop allows (?preprocess= overrides per request)"
    )


class Budget(_Group):
    """A token bucket: a client may send ``burst`` requests at once and ``rate`` a second on average."""

    rate: float = Field(ge=0, le=1_000_000, description="requests a second a client may send on average; 0: no limit")
    burst: int = Field(ge=1, le=1_000_000, description="requests a client may send at once (the bucket's size)")


# Where the defaults come from (docs/operations.md): a request on a model route costs the ingress and the proxy
# 20-35 ms of CPU (loading and cropping a 500x375 JPEG, the PNG or JSON out, Serve's own work; measured with
# benchmarks/serve_load.py), a cheap one 5-12 ms (benchmarks/hostile_load.py). One ingress replica's event loop is
# one core: about 30-50 model requests a second. A client address gets at most an eighth of that core: 5 model
# requests a second and 10 cheap ones. A model burst of 16 is one model replica's max_ongoing_requests (a client may
# fill one replica's slots at once); a cheap burst of 20 is two seconds of its rate.
MODEL_BUDGET = {"rate": 5.0, "burst": 16}
CHEAP_BUDGET = {"rate": 10.0, "burst": 20}


class RateLimits(_Group):
    """How often one client (an address, or an API key's name) may ask (``api.admission``, ``oip.grpc_service``)."""

    model: Budget = Field(
        default_factory=lambda: Budget(**MODEL_BUDGET),
        description="model routes: /v1's image and text verbs, the OIP's infer (REST and gRPC)",
    )
    cheap: Budget = Field(
        default_factory=lambda: Budget(**CHEAP_BUDGET),
        description="every other route: health, readiness, metadata, the page, the docs",
    )
    refusal_delay_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="a request past its budget is answered 429 after this pause (no CPU spent), times one more than "
        "the refusals its client already has waiting",
    )
    max_refusal_delay_s: float = Field(10.0, ge=0, le=600, description="the longest pause before a 429")
    max_pending_refusals: int = Field(
        32, ge=0, le=100_000, description="refusals one client may have waiting out their pause; more: 429 at once"
    )
    max_clients: int = Field(
        4096, ge=1, le=1_000_000, description="clients whose budgets an ingress replica remembers (least recent go)"
    )


#: A key's SHA-256 digest: 64 hex digits (``printf %s "$KEY" | sha256sum``).
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class NamedKey(_Group):
    """One API key: the SHA-256 digests that are valid for it (two while it is rotated) and its own budgets."""

    sha256: list[str] = Field(min_length=1, description="hex SHA-256 digests of the valid keys of this name")
    model: Budget | None = Field(None, description="this key's model-route budget (default rate_limits.model)")
    cheap: Budget | None = Field(None, description="this key's cheap-route budget (default rate_limits.cheap)")

    @field_validator("sha256", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: list[str]) -> list[str]:
        digests = [digest.strip().lower() for digest in value]
        for digest in digests:
            if not SHA256_HEX.fullmatch(digest):
                raise ValueError(
                    'sha256: 64 hex digits, the key\'s SHA-256 digest (printf %s "$KEY" | sha256sum); never the key'
                )
        return digests


class Keys(_Group):
    """Named API keys (``callers.KeyRing``): hashes here (``serve config`` and the dashboard show them), and more
    in ``file`` (a mounted secret, same form), read on every reconfigure and when it changes."""

    named: dict[str, NamedKey] = Field(default_factory=dict, description="key name -> its digests and budgets")
    file: str | None = Field(None, description="a YAML or JSON file of more named keys, in the form of `named`")

    @field_validator("named")
    @classmethod
    def _valid_names(cls, value: dict[str, NamedKey]) -> dict[str, NamedKey]:
        for name in value:
            check_key_name(name)
        return value


#: Key names: what logs and metrics show (letters, digits, ``_``, ``-``, ``.``).
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_key_name(name: str) -> str:
    """``name`` when it is a valid key name, else ValueError."""
    if not KEY_NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '_', '-' and '.' (at most 63)")
    return name


class IngressConfig(_Group):
    """The ingress deployment's ``user_config``: everything the HTTP and gRPC routes enforce, read by every route
    from this one object (``api``, ``oip``), so that no route can drift from another."""

    limits: Limits = Field(default_factory=Limits)
    text: TextLimits = Field(default_factory=TextLimits)
    uploads: Uploads = Field(default_factory=Uploads)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    keys: Keys = Field(default_factory=Keys)

    def merged(self, changes: Mapping[str, Any] | None) -> IngressConfig:
        """This config with ``changes`` (a ``user_config``: some groups, some keys of each) applied over it."""
        return _merge(self, changes, "VTPIngress user_config")


#: Every flat key ``args`` accepted before the groups existed -> ``(group, key)``. Deprecated aliases included.
FLAT_KEYS: Mapping[str, tuple[str, str]] = {
    "max_batch_size": ("batching", "max_batch_size"),
    "batch_wait_timeout_s": ("batching", "batch_wait_timeout_s"),
    **{key: ("limits", key) for key in Limits.model_fields},
    **{key: ("text", key) for key in TextLimits.model_fields},
    "body_timeout_s": ("uploads", "body_timeout_s"),
    "max_uploads_per_client": ("uploads", "max_uploads_per_client"),
    "upload_refusal_delay_s": ("uploads", "refusal_delay_s"),
    "client_address_header": ("uploads", "client_address_header"),
    "fast_preprocess": ("preprocess", "fast"),
    "draft_decode": ("preprocess", "fast"),  # deprecated name of fast_preprocess
}


class AppSettings(BaseModel):
    """Validated application settings; see serve_config.yaml and the module docstring for what each one does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="checkpoint directory, or random:vtp-small (required)")
    precision: Literal[PRECISIONS] = "fp32"
    device: str | None = Field(None, description="default: the accelerator Ray assigns each replica, else the CPU")
    placement: str | dict[str, Any] = Field(
        "auto", description="auto, npu, gpu, cpu or Ray actor options; a config's ray_actor_options overrides it"
    )
    image_size: int = Field(256, ge=PATCH_SIZE, le=4096, description="default side of the square model input")
    api_key: SecretStr | None = None
    model_name: str = Field("vtp", description="the name requests use for `model` (the default model)")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="more checkpoints served beside `model`, by name: one model deployment each (VTPReplica-<name>)",
    )
    label_cache_size: int = Field(64, ge=1, le=100_000, description="label sets whose text embeddings a replica keeps")
    compile: Literal[COMPILE_MODES] = Field(
        "auto",
        description="the image verbs through torch.compile: off, on, or auto (bf16/fp16 on an accelerator or an AMX "
        "CPU); a replica becomes ready once the graphs of image_size are compiled",
    )
    compile_cache: str | None = Field(None, description="persistent compile cache directory (default: per machine)")
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, model calls of up to the largest batch replay recorded CUDA graphs (at most 16 per "
        "replica): small batches run at the GPU's rate instead of the kernel-launch rate",
    )
    cpu_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        "auto",
        description="torch threads of a CPU model replica: auto (of the CPUs its placement gives it, the fewest "
        "within 25% of the fastest at warm-up: small models run on one) or a number",
    )

    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    text: TextLimits = Field(default_factory=TextLimits)
    uploads: Uploads = Field(default_factory=Uploads)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    keys: Keys = Field(default_factory=Keys)

    @model_validator(mode="before")
    @classmethod
    def _fold_flat_keys(cls, data: Any) -> Any:
        """Today's flat keys go into their groups; the same setting given twice is an error naming both places."""
        if not isinstance(data, Mapping):
            return data
        given: dict[tuple[str, str], str] = {}  # (group, key) -> where the config gave it
        groups: dict[str, dict[str, Any]] = {}
        for name in _GROUPS:
            nested = data.get(name)
            if isinstance(nested, Mapping):
                # key by key over the group's defaults, at every depth (rate_limits: {model: {rate: 20}} keeps the
                # model burst), as a user_config applies
                groups[name] = _deep_merge(cls.model_fields[name].default_factory().model_dump(), nested)
                given.update({(name, key): f"args.{name}.{key}" for key in nested})
        for flat, (group, key) in FLAT_KEYS.items():
            if flat not in data:
                continue
            if (group, key) in given:
                raise ValueError(f"{group}.{key} is given twice, as {given[group, key]} and as args.{flat}: keep one")
            given[group, key] = f"args.{flat}"
            groups.setdefault(group, {})[key] = data[flat]
        return {**{k: v for k, v in data.items() if k not in FLAT_KEYS}, **groups}

    @field_validator("image_size")
    @classmethod
    def _multiple_of_patch(cls, value: int, info: ValidationInfo) -> int:
        return _check_patch_multiple(str(info.field_name), value)

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

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return value or None

    @model_validator(mode="after")
    def _consistent(self) -> AppSettings:
        if self.image_size > self.limits.max_image_size:
            raise ValueError(
                f"image_size {self.image_size} is larger than limits.max_image_size {self.limits.max_image_size}"
            )
        if self.model_name in self.models:
            raise ValueError(f"models.{self.model_name} clashes with model_name, the default model's name")
        return self

    def checkpoints(self) -> dict[str, str]:
        """Every served model by name, the default first."""
        return {self.model_name: self.model, **self.models}

    def ingress_config(self) -> IngressConfig:
        """The ingress deployment's part: its initial ``user_config``."""
        return IngressConfig(
            limits=self.limits,
            text=self.text,
            uploads=self.uploads,
            preprocess=self.preprocess,
            rate_limits=self.rate_limits,
            keys=self.keys,
        )

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ) -> AppSettings:
        """Validate the config's ``args``, after the ``VTP_*`` env vars that are set replace their fields."""
        merged = dict(args or {})
        for field, var in ENV_OVERRIDES.items():
            if environ.get(var):
                merged[field] = environ[var]
        return cls.model_validate(merged)


#: The live groups (each one a ``user_config`` part).
_GROUPS = ("batching", "limits", "text", "uploads", "preprocess", "rate_limits", "keys")


def merge_batching(base: Batching, changes: Mapping[str, Any] | None) -> Batching:
    """The model deployment's batching with a ``user_config`` applied over it (keys it leaves out keep theirs)."""
    return _merge(base, changes, "VTPReplica user_config")


def _merge(base: BaseModel, changes: Mapping[str, Any] | None, what: str) -> Any:
    if changes is None:
        return base
    if not isinstance(changes, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(changes).__name__}")
    return type(base).model_validate(_deep_merge(base.model_dump(), changes))


def _deep_merge(values: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``changes`` applied key by key, at every depth (a mapping replaces only what it names)."""
    merged = dict(values)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_patch_multiple(name: str, value: int) -> int:
    if value % PATCH_SIZE:
        raise ValueError(f"{name} must be a multiple of {PATCH_SIZE}, got {value}")
    return value


def _check_model_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_' and '-' (at most 63, no leading '-' or '_')")
    return name
