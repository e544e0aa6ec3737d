"""Ray Serve application for VTP: a FastAPI ingress in front of dynamically batched model deployments.

``serve run serve_config.yaml`` (or ``serve deploy``) builds it with ``deployments.app:build_app``. Three rooms, each
a package: ``api`` (the HTTP API ``/v1``, the page, uploads), ``oip`` (the Open Inference Protocol: one data plane,
REST and gRPC adapters) and ``model`` (the model deployment, its batching, model selection and readiness). Below
them: ``settings`` (the one settings tree), ``state`` (what every route reads), ``errors``, ``requests`` and
``texts`` (request checks every room shares), ``metrics``. Above them: ``ingress`` (the ingress deployment) and
``app`` (the builder). Importing the package does not import torch: only the model replicas load it.
"""

from .app import build_app, compose_app
from .settings import AppSettings

#: The earlier name of ``AppSettings``.
AppArgs = AppSettings

__all__ = ["AppArgs", "AppSettings", "build_app", "compose_app"]
