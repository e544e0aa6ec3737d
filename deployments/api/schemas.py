"""Pydantic models of the JSON bodies the API accepts and returns."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..settings import Batching, Budget, Limits

_Dim = Annotated[int, Field(ge=1, le=65536)]


class ErrorResponse(BaseModel):
    """Every error: a message saying what was wrong (422s also carry pydantic's ``detail``)."""

    error: str


class EncodeResponse(BaseModel):
    """``/v1/encode``: the latents of one image and its CLIP embedding."""

    shape: list[int] = Field(description="[C, h, w]")
    dtype: str = Field("float32", description="always float32")
    latents: str = Field(description="base64 of the C-order, little-endian float32 bytes")
    clip_embedding: list[float] | None = Field(description="normalized CLIP image embedding; null without CLIP head")


class LatentsPayload(BaseModel):
    """``/v1/decode``'s JSON body: what ``/v1/encode`` returns (``clip_embedding`` may stay in, it is ignored)."""

    model_config = ConfigDict(extra="ignore")

    shape: Annotated[list[_Dim], Field(max_length=8, description="[C, h, w], or [N, C, h, w] for a batch")]
    dtype: str = Field(description="must be float32")
    latents: str = Field(description="base64 of the C-order, little-endian float32 bytes")


class EmbedResponse(BaseModel):
    """``/v1/embed``: the normalized CLIP image embedding."""

    embedding: list[float]
    dim: int


class EmbedTextRequest(BaseModel):
    """``/v1/embed-text``'s body."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(description="the texts to embed (OpenAI CLIP BPE, cut to the model's context)")


class EmbedTextResponse(BaseModel):
    """``/v1/embed-text``: one normalized CLIP text embedding per text, in order."""

    embeddings: list[list[float]]
    dim: int


class LabelScore(BaseModel):
    label: str
    probability: float
    logit: float = Field(description="exp(logit_scale) * cosine similarity [+ logit_bias]")


class ClassifyResponse(BaseModel):
    """``/v1/classify``: the labels, most probable first."""

    labels: list[LabelScore]
    activation: str = Field(description="softmax over the labels (CLIP), or sigmoid per label (a logit bias: SigLIP)")
    templates: int = Field(description="prompt templates averaged per label")


class Health(BaseModel):
    status: str = "ok"


class RequestLimits(Limits):
    """``/v1/model``'s ``limits``: the ingress's live limits, the default input size and whether a key is needed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int
    api_key_required: bool


class ReplicaProcess(BaseModel):
    """Which Serve replica of the model deployment answered, where it runs, and the accelerators Ray gave it."""

    id: str
    actor_name: str
    node_id: str
    loaded_at: float = Field(description="when this replica loaded its model (Unix time): unchanged by reconfigure")
    visible_devices: dict[str, str] = Field(description="ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES")
    accelerator_ids: dict[str, list[str]] = Field(description="Ray's accelerator ids by resource, e.g. NPU")
    cpu_threads: int = Field(
        description="torch's intra-op threads: of num_cpus in the placement, what the app's cpu_threads chose"
    )
    cpu_thread_timings_ms: dict[int, float] = Field(
        default_factory=dict,
        description="cpu_threads auto: a warm-up call's milliseconds by thread count (empty where none was tried: "
        "one thread, an accelerator, a compiled replica, or a one-image call of 50 ms or more)",
    )
    openmp_waits: dict[str, str] = Field(
        default_factory=dict,
        description="how OpenMP's idle threads wait in the replica's process (OMP_WAIT_POLICY, GOMP_SPINCOUNT): "
        "GOMP_SPINCOUNT=1000 by default on CPU replicas",
    )


class CallerInfo(BaseModel):
    """Who the API took the request for (``/v1/model``'s ``caller``), and the budgets its requests are charged to."""

    key: str | None = Field(description="the name of the API key the request sent; null without a valid one")
    client: str = Field(description="the client address (the last entry of client_address_header, when set)")
    model: Budget = Field(description="this caller's budget of model requests (rate: 0 means no limit)")
    cheap: Budget = Field(description="this caller's budget of other requests")


class ModelInfo(BaseModel):
    """``/v1/model``: what the replica that answered serves, and how."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    model_spec: str
    random_weights: bool
    config_digest: str
    device: str
    precision: str
    latent_channels: int
    embedding_dim: int | None
    batching: Batching
    replica: ReplicaProcess
    limits: RequestLimits
    caller: CallerInfo
