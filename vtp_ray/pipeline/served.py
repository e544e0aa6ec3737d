"""Jobs on a running Serve app: the app's model replicas do the model work, at batch priority.

With ``PipelineSpec.serve`` (``--serve-app NAME``), a job starts no replicas of its own: its model stage is a pool
of small CPU tasks (``worker.served_stage``; an eval job's, which builds metric networks, small CPU actors) whose
``ServedReplica`` stands in for a ``VTPReplica``, sending each block to the app's model deployment
(``ModelDeployment.run_block``, through Serve's deployment handle). There every input is an item of the replica's
batch queue, run only while no online request waits (``deployments/model/batching.py``). The job's preprocess stage,
outputs, resume and reports are those of a standalone run; metrics that need networks of their own (SSIM, LPIPS,
rFID features) run in the job's actors on what the app returns.

The job gets exactly the model it asks for or nothing: before it reads anything, ``connect`` compares the app's
model identity (config digest, random weights, precision, RoPE dtype) with the job's and refuses a difference,
naming what the app serves; every block carries the identity the job expects, and a replica that serves another
model (the app was redeployed mid-job) refuses it, which ends the job with ``ServedModelChanged`` (its finished
parts stay; re-run against a matching app to resume). A replica that dies or is replaced mid-block costs a retry
of that block, never a lost or repeated row.

Pool size: one block in flight per running model replica (``ServeTarget.calls`` to change it), so the job never
holds more than one of a replica's ``max_ongoing_requests`` and adds at most 1 to each replica's ongoing count,
which Serve's autoscaler reads (see docs/shared-fleet.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..outputs import Encoded, ReplicaInfo, ZeroShot, identity_differences

__all__ = ["ServeTarget", "ServedApp", "ServedModelChanged", "ServedReplica", "connect"]

log = logging.getLogger(__name__)

#: Handle calls retried when a replica dies, is replaced or is at capacity: with backoff, about a minute in all.
RETRIES = 12


class ServedModelChanged(RuntimeError):
    """The app's model replicas serve another model than the job's (redeployed mid-job)."""


@dataclass(frozen=True)
class ServeTarget:
    """A running Serve app a job uses instead of replicas of its own.

    Args:
        app: the Serve application's name (``serve status`` lists them).
        model: which of the app's models (its ``model_name`` or a key of its ``models``); None: its default.
        calls: blocks in flight at once; None: one per running replica of the model deployment.
    """

    app: str
    model: str | None = None
    calls: int | None = None

    def __post_init__(self) -> None:
        if not self.app:
            raise ValueError("the Serve app's name is empty")
        if self.calls is not None and self.calls < 1:
            raise ValueError(f"calls must be >= 1, got {self.calls}")


@dataclass(frozen=True)
class ServedApp:
    """The app's model deployment a job runs on: its name, its running replicas, what it serves."""

    target: ServeTarget
    deployment: str
    replicas: int
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """What reports say of it."""
        return {
            "app": self.target.app,
            "model": self.target.model,
            "deployment": self.deployment,
            "replicas": self.replicas,
            "model_replica": self.info.get("replica", {}).get("id"),
            "priority": "batch",
        }


def connect(target: ServeTarget, expected: Mapping[str, Any]) -> ServedApp:
    """The app's model deployment, checked before the job reads anything: it exists, has a running replica, and
    serves the model ``expected`` describes (``ReplicaInfo.identity``); else ``ValueError`` naming what it serves."""
    from ray import serve

    from deployments.model.protocol import DEPLOYMENT_NAME, deployment_name

    try:
        status = serve.status()
    except Exception as e:
        raise ValueError(f"no Serve instance on this Ray cluster ({type(e).__name__}: {e}): start the app first") from e
    app = status.applications.get(target.app)
    if app is None:
        raise ValueError(f"no Serve application {target.app!r} on this cluster; running: {sorted(status.applications)}")
    models = sorted(name for name in app.deployments if name.startswith(DEPLOYMENT_NAME))
    deployment = deployment_name(target.model, False) if target.model else DEPLOYMENT_NAME
    if deployment not in app.deployments:
        raise ValueError(f"application {target.app!r} has no model deployment {deployment}; it has {models}")
    running = int(app.deployments[deployment].replica_states.get("RUNNING", 0))
    if not running:
        raise ValueError(f"{target.app}/{deployment} has no running replica ({app.deployments[deployment].status})")
    info = _call(serve.get_deployment_handle(deployment, target.app), "info")
    served = ReplicaInfo.from_dict(info).identity()
    differences = identity_differences(expected, served)
    if differences:
        raise ValueError(
            f"application {target.app!r} serves {info.get('model')} ({'; '.join(differences)}): run the job with "
            "that model and precision, or without --serve-app"
        )
    return ServedApp(target, deployment, running, info)


class ServedReplica:
    """A stand-in for ``VTPReplica`` in a job's model stage: the same verbs, computed by the app's model replicas.

    Args:
        served: the app's model deployment (``connect``'s answer, made on the driver).
        expected: the model identity every block must be computed with.
    """

    device = "cpu"  # where the job's own work on the answers (metrics) runs

    def __init__(self, served: ServedApp, expected: Mapping[str, Any]) -> None:
        from ray import serve

        self._handle = serve.get_deployment_handle(served.deployment, served.target.app)
        self._expected = dict(expected)
        self._app = served.target.app
        self.info = ReplicaInfo.from_dict(served.info)
        self.label = f"serve {self._app}/{served.deployment}"
        # What the app's replicas said when the job started: they compile their shapes before serving them.
        self.runs_compiled = bool(self.info.compile and self.info.compile.compiled)

    # ------------------------------------------------------------------------------------------ verbs

    def encode(self, images: np.ndarray) -> Encoded:
        """As ``VTPReplica.encode``: latents ``(N, C, h, w)`` and CLIP embeddings ``(N, D)``."""
        return self._block("encode", images)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """As ``VTPReplica.decode``: uint8 ``(N, H, W, 3)``."""
        return self._block("decode", np.ascontiguousarray(latents, np.float32))

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """As ``VTPReplica.reconstruct``."""
        return self._block("reconstruct", images)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """As ``VTPReplica.embed``: normalized CLIP image embeddings ``(N, D)``."""
        return self._block("embed", images)

    def embed_text(self, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
        """As ``VTPReplica.embed_text``; the texts travel as inputs of ``chunk`` texts."""
        return self._block("embed_text", [tuple(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])

    def zero_shot(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> ZeroShot:
        """As ``VTPReplica.zero_shot`` (the checkpoint's logit scale lives on the app's replicas)."""
        return self._retried(lambda: self._handle.zero_shot.remote(image_embeddings, class_embeddings).result())

    def classify(self, images: np.ndarray, class_embeddings: np.ndarray) -> ZeroShot:
        """As ``VTPReplica.classify``."""
        return self.zero_shot(self.embed(images), class_embeddings)

    # ---------------------------------------------------------------------------------------- helpers

    def _block(self, verb: str, inputs: Any) -> Any:
        block = self._retried(lambda: self._handle.run_block.remote(verb, inputs, self._expected).result())
        self.label = f"serve {self._app} replica {block.replica}"
        return block.values

    def _retried(self, call: Callable[[], Any]) -> Any:
        return _retry(call, f"app {self._app!r}")


def _call(handle: Any, method: str, *args: Any) -> Any:
    return _retry(lambda: getattr(handle, method).remote(*args).result(), "the app")


def _retry(call: Callable[[], Any], what: str) -> Any:
    """``call()``, again with backoff when a replica died, was replaced or was at capacity; a replica that serves
    another model ends it with ``ServedModelChanged``."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    from deployments.model.protocol import ModelMismatch

    for attempt in range(RETRIES):
        try:
            return call()
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ModelMismatch) or "ModelMismatch" in str(e):
                raise ServedModelChanged(f"{what}: {cause or e}; the parts written so far stay") from e
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError) as e:
            if attempt == RETRIES - 1:
                raise
            delay = min(0.25 * 2**attempt, 8.0)
            log.warning("%s: %s; retrying the block in %.1fs", what, type(e).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
