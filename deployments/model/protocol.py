"""What the ingress and the model replicas say to each other (torch-free: the ingress process never loads torch).

The ingress sends ``(verb, array)`` with an already validated array to the model deployment of the model it picked
(``deployment_name``); the replica answers with an ``Outcome``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vtp_ray.outputs import Encoded, identity_differences

#: The model deployment's Serve name (``VTPReplica``: configs name it under ``deployments:``).
DEPLOYMENT_NAME = "VTPReplica"


def deployment_name(model: str, default: bool) -> str:
    """The Serve deployment that serves ``model``: ``VTPReplica`` for the default model, else ``VTPReplica-<name>``."""
    return DEPLOYMENT_NAME if default else f"{DEPLOYMENT_NAME}-{model}"


#: The replica verbs a request can ask for (``VTPReplica``'s; one array per request, batched by the replica).
#: ``embed_text`` takes a tuple of strings instead: the texts of concurrent requests share one model call.
Verb = Literal["encode", "decode", "reconstruct", "embed", "embed_text"]


@dataclass(frozen=True)
class Outcome:
    """One request's result, the size of the model call it ran in, and where its time in the replica went.

    ``value`` is per verb: ``encode`` -> ``Encoded`` of one image (no batch dimension), ``decode`` / ``reconstruct``
    -> uint8 ``(H, W, 3)``, ``embed`` -> float32 ``(D,)``, ``embed_text`` -> float32 ``(n, D)`` for the request's n
    texts; a classification -> ``ClassScores``.
    """

    value: Any
    batch_size: int
    queue_ms: float  # from arriving at the replica until its model call started
    model_ms: float  # its model call


@dataclass(frozen=True)
class ClassScores:
    """One image's zero-shot result: a score per label, in the order the labels were sent."""

    logits: np.ndarray  # (C,) float32
    probabilities: np.ndarray  # (C,) float32
    activation: str  # "softmax" (CLIP) or "sigmoid" (a logit bias: SigLIP-style)
    templates: int  # prompt templates averaged per label
    cache_hit: bool  # the label set's text embeddings came from the replica's cache


@dataclass(frozen=True)
class Block:
    """A job's block computed at batch priority (``ModelDeployment.run_block``): the values of its inputs in order,
    stacked as the verb's batch result (``stacked``), and which model and which Serve replica computed them."""

    values: Any
    identity: dict[str, Any]
    replica: str


def stacked(verb: Verb, values: list[Any]) -> Any:
    """One result per input -> the verb's batch result: ``Encoded`` of N images, an ``(N, ...)`` array, or for
    ``embed_text`` the inputs' text embeddings concatenated. One array travels back to the job instead of one
    object per input (Ray serializes each array of a list on its own)."""
    if verb == "embed_text":
        return np.concatenate(values)
    if verb == "encode":
        return Encoded.stack(values)
    return np.stack(values)


class ModelMismatch(ValueError):
    """The app serves another model than the one a job asked for (it was redeployed, or never served it)."""

    def __init__(self, expected: Mapping[str, Any], served: Mapping[str, Any]) -> None:
        self.expected, self.served = dict(expected), dict(served)
        super().__init__(f"the app serves another model: {'; '.join(identity_differences(expected, served))}")

    def __reduce__(self) -> tuple[type[ModelMismatch], tuple[dict[str, Any], dict[str, Any]]]:
        return (type(self), (self.expected, self.served))
