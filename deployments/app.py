"""The Serve application builder: ``import_path: deployments.app:build_app`` in serve_config.yaml.

``placement: auto`` (the default) is resolved here, when the application is built: one NPU per model replica when
the cluster has NPUs, else one GPU, else one CPU; an explicit placement the cluster cannot satisfy fails the
deployment at once with a message naming the setting, instead of leaving replicas pending forever. The result is
the model deployment's ``ray_actor_options``, which a config's ``deployments: [{name: VTPReplica,
ray_actor_options: ...}]`` overrides the standard way; either way each replica's device follows the accelerator
Ray assigns it. Building never starts Ray: without a connection (``serve run deployments.app:build_app`` builds
before it connects), ``auto`` is resolved from the accelerators Ray would detect on this machine.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from ray import serve
from ray.serve import Application

from vtp_ray.placement import resolve_placement

from .config import AppArgs
from .ingress import IngressSettings, VTPIngress
from .models import deployment_name
from .replica import BatchingConfig, ReplicaDeployment
from .text_inputs import TextLimits
from .uploads import UploadPolicy

PLACEMENT_SETTING = "applications[].args.placement"

#: Rolling updates start a replacement before stopping an old replica (Serve's ``max_surge_percent``, Ray >= 2.60):
#: a push whose replicas cannot start (a placement the cluster lacks, a broken checkpoint) leaves the old ones
#: serving instead of taking the service down. It needs room for the extra replicas; where every accelerator is
#: in use, set ``max_surge_percent: 0`` on the deployment in the config (then Serve stops 20% first).
ROLLOUT = {"max_surge_percent": 20} if "max_surge_percent" in inspect.signature(serve.deployment).parameters else {}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application from its ``args`` (``VTP_MODEL``, ``VTP_PRECISION``, ``VTP_DEVICE``,
    ``VTP_API_KEY`` override theirs)."""
    return compose_app(AppArgs.from_args(args))


def compose_app(args: AppArgs, **model_options: Any) -> Application:
    """The ingress bound to one model deployment per served checkpoint (``VTPReplica`` for ``args.model``,
    ``VTPReplica-<name>`` for each of ``args.models``).

    ``model_options`` are extra Serve deployment options for the model deployments (``num_replicas``,
    ``user_config``, ``max_queued_requests``...), for callers that build the app in Python rather than from a
    config file, where the ``deployments:`` section sets them (per deployment).
    """
    batching = BatchingConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    options = {
        "ray_actor_options": resolve_placement(args.placement, _nodes(), setting=PLACEMENT_SETTING),
        "user_config": batching.model_dump(),
        **ROLLOUT,
        **model_options,
    }
    models = {
        name: ReplicaDeployment.options(name=deployment_name(name, name == args.model_name), **options).bind(
            model=checkpoint,
            precision=args.precision,
            device=args.device,
            warmup_size=args.image_size,
            label_cache_size=args.label_cache_size,
        )
        for name, checkpoint in args.checkpoints().items()
    }
    settings = IngressSettings(
        image_size=args.image_size,
        max_image_size=args.max_image_size,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        api_key=args.api_key.get_secret_value() if args.api_key else None,
        default_model=args.model_name,
        model_wait_s=args.model_wait_s,
        max_decode_batch=args.max_decode_batch,
        max_decode_pixels=args.max_decode_pixels,
        text_limits=TextLimits(
            max_texts=args.max_texts,
            max_labels=args.max_labels,
            max_templates=args.max_templates,
            max_text_chars=args.max_text_chars,
        ),
        draft_decode=args.draft_decode,
        uploads=UploadPolicy(
            body_timeout_s=args.body_timeout_s,
            max_uploads_per_client=args.max_uploads_per_client,
            refusal_delay_s=args.upload_refusal_delay_s,
            client_address_header=args.client_address_header,
        ),
    )
    return VTPIngress.bind(models, settings)


def _nodes() -> list[dict[str, float]]:
    """Each node's resources: the connected cluster's, else what Ray would detect on this machine."""
    import ray

    if ray.is_initialized():
        from vtp_ray.placement import cluster_nodes

        return cluster_nodes()
    from ray._private.accelerators import get_accelerator_manager_for_resource

    node = {"CPU": float(os.cpu_count() or 1)}
    for resource in ("NPU", "GPU"):
        try:
            count = get_accelerator_manager_for_resource(resource).get_current_node_num_accelerators()
        except Exception:  # a probe that fails means none usable here
            count = 0
        if count:
            node[resource] = float(count)
    return [node]
