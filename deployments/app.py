"""The Serve application builder: ``import_path: deployments.app:build_app`` in serve_config.yaml.

Placement is resolved here, when the application is built, from what the cluster has: ``auto`` asks for an NPU
per model replica on Ascend, else a GPU, else a CPU; an explicit placement the cluster cannot satisfy fails the
deployment at once with a message naming the setting, instead of leaving replicas pending forever.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from vtp_ray.placement import device_for, resolve_placement

from .api import IngressSettings, VTPIngress
from .config import AppArgs
from .model import VTPModelDeployment

PLACEMENT_SETTING = "applications[].args.placement in serve_config.yaml"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application from its ``args`` (``VTP_MODEL``, ``VTP_PRECISION``, ``VTP_DEVICE``,
    ``VTP_API_KEY`` override theirs)."""
    return compose_app(AppArgs.from_args(args))


def compose_app(args: AppArgs, **model_options: Any) -> Application:
    """The ingress bound to the model deployment.

    ``model_options`` are extra Serve deployment options for the model deployment (``num_replicas``,
    ``max_queued_requests``...), for callers that build the app in Python rather than from a config file,
    where the ``deployments:`` section sets them.
    """
    if not ray.is_initialized():
        ray.init(namespace="serve")  # `serve run deployments.app:build_app` builds before it connects
    placement = resolve_placement(args.placement, setting=PLACEMENT_SETTING)
    options = {
        "ray_actor_options": placement,
        # A batch running and the next one's worth waiting: @serve.batch never forms a batch larger than this.
        "max_ongoing_requests": 2 * args.max_batch_size,
        **model_options,
    }
    model = VTPModelDeployment.options(**options).bind(
        model=args.model,
        device=args.device or device_for(placement),
        precision=args.precision,
        warmup_size=args.image_size,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    settings = IngressSettings(
        image_size=args.image_size,
        max_image_size=args.max_image_size,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        api_key=args.api_key.get_secret_value() if args.api_key else None,
    )
    return VTPIngress.bind(model, settings)
