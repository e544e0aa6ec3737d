"""What the ingress and the model replicas say to each other (torch-free: the ingress process never loads torch).

The ingress sends ``(verb, array)`` with an already validated array; the replica answers with an ``Outcome``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: The replica verbs a request can ask for (``VTPReplica``'s; one array per request, batched by the replica).
Verb = Literal["encode", "decode", "reconstruct", "embed"]


@dataclass(frozen=True)
class Outcome:
    """One request's result, the size of the model call it ran in, and where its time in the replica went.

    ``value`` is per verb: ``encode`` -> ``Encoded`` of one image (no batch dimension), ``decode`` / ``reconstruct``
    -> uint8 ``(H, W, 3)``, ``embed`` -> float32 ``(D,)``.
    """

    value: Any
    batch_size: int
    queue_ms: float  # from arriving at the replica until its model call started
    model_ms: float  # its model call
