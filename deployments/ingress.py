"""The ingress deployment (``VTPIngress``): one FastAPI app serving ``/v1`` (``api``) and the Open Inference Protocol
over REST (``oip.rest``), and the protocol's gRPC service (``oip.grpc_service``) when Serve's gRPC proxy is on.

Requests are checked here (API key, content type, byte and pixel limits, image loading, latents), before they reach
a model deployment's batch queue, so a bad request never fails its batch-mates; loading and PNG encoding run in
threads, so the event loop keeps accepting requests meanwhile. The ingress never imports torch.

Its live settings (``settings.IngressConfig``: limits, text, uploads, preprocess, rate_limits, keys) are its
``user_config``: a ``serve deploy`` that changes only them reconfigures the running ingress replicas (a new key set
included), and no model replica restarts.
"""

from __future__ import annotations

from typing import Any

from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from vtp_ray import __version__

from .api import attach_routers
from .api.admission import Admission
from .api.uploads import UploadGuard
from .errors import install_error_handlers
from .model.selection import ModelSet
from .oip.grpc_service import InferenceService
from .oip.rest import attach_router
from .settings import AppSettings, IngressConfig
from .state import IngressState, install

INGRESS_NAME = "VTPIngress"

# FastAPIOffline: /docs serves Swagger UI's files from the package itself (FastAPI's loads them from a CDN, and the
# page stays blank on machines without internet).
app = FastAPIOffline(
    title="VTP visual tokenizer",
    version=__version__,
    description="Image in; reconstruction, latents or CLIP embedding out. Errors are JSON {'error': ...}.",
)
app.add_middleware(UploadGuard)
app.add_middleware(Admission)  # the outermost: rate limits before the upload guard takes a slot
install_error_handlers(app)
attach_routers(app)
attach_router(app)


# A request holds an ingress slot while its body arrives (up to body_timeout_s): slots are cheap (no model work,
# which the model deployment's own queue bounds), so there are many, and max_uploads_per_client caps one client's.
@serve.deployment(
    name=INGRESS_NAME,
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
    user_config=IngressConfig().model_dump(),
)
@serve.ingress(app)
class VTPIngress(InferenceService):
    """The HTTP API and the OIP in front of the model deployments (one per served checkpoint).

    Args:
        models: model name -> handle of its model deployment (the default model first).
        settings: the application's settings; ``settings.ingress_config()`` is the base every ``user_config``
            applies over.
    """

    def __init__(self, models: dict[str, DeploymentHandle], settings: AppSettings) -> None:
        config = settings.ingress_config()
        model_set = ModelSet(
            models, settings.model_name, serve.get_replica_context().app_name, config.limits.model_wait_s
        )
        self.state = IngressState(model_set, settings, config)
        install(self.state)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (keys it leaves out keep the app's values) to this running replica."""
        self.state.reconfigure(config)
