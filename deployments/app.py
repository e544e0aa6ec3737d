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

from .ingress import VTPIngress
from .model.deployment import ModelDeployment
from .model.protocol import deployment_name
from .settings import AppSettings

PLACEMENT_SETTING = "applications[].args.placement"

#: Rolling updates start a replacement before stopping an old replica (Serve's ``max_surge_percent``, Ray >= 2.60):
#: a push whose replicas cannot start (a placement the cluster lacks, a broken checkpoint) leaves the old ones
#: serving instead of taking the service down. It needs room for the extra replicas; where every accelerator is
#: in use, set ``max_surge_percent: 0`` on the deployment in the config (then Serve stops 20% first).
ROLLOUT = {"max_surge_percent": 20} if "max_surge_percent" in inspect.signature(serve.deployment).parameters else {}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the application from its ``args`` (``VTP_MODEL``, ``VTP_PRECISION``, ``VTP_DEVICE``,
    ``VTP_API_KEY`` override theirs)."""
    return compose_app(AppSettings.from_args(args))


def compose_app(settings: AppSettings, **model_options: Any) -> Application:
    """The ingress bound to one model deployment per served checkpoint (``VTPReplica`` for ``settings.model``,
    ``VTPReplica-<name>`` for each of ``settings.models``). Each deployment gets its own part of the settings: the
    model deployments their ``batching`` as ``user_config``, the ingress its ``IngressConfig``.

    ``model_options`` are extra Serve deployment options for the model deployments (``num_replicas``,
    ``user_config``, ``max_queued_requests``...), for callers that build the app in Python rather than from a
    config file, where the ``deployments:`` section sets them (per deployment).
    """
    options = {
        "ray_actor_options": resolve_placement(settings.placement, _nodes(), setting=PLACEMENT_SETTING),
        "user_config": settings.batching.model_dump(),
        **ROLLOUT,
        **model_options,
    }
    models = {
        name: ModelDeployment.options(name=deployment_name(name, name == settings.model_name), **options).bind(
            model=checkpoint,
            precision=settings.precision,
            device=settings.device,
            warmup_size=settings.image_size,
            label_cache_size=settings.label_cache_size,
            batching=settings.batching,
            compile=settings.compile,
            compile_cache=settings.compile_cache,
            cuda_graphs=settings.cuda_graphs,
            cpu_threads=settings.cpu_threads,
        )
        for name, checkpoint in settings.checkpoints().items()
    }
    ingress = VTPIngress.options(user_config=settings.ingress_config().model_dump())
    return ingress.bind(models, settings)


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
