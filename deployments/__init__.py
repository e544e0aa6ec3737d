"""Ray Serve application for VTP: a FastAPI ingress in front of dynamically batched model deployments.

``serve run serve_config.yaml`` (or ``serve deploy``) builds it with ``deployments.app:build_app``. Three rooms: the
HTTP API (``api``), the Open Inference Protocol (``oip``) and the model deployment (``model``), over one settings
tree (``settings``); ARCHITECTURE.md lists every module. Importing the package does not import torch: only the model
replicas load it.
"""

from .app import build_app, compose_app
from .settings import AppSettings

#: The earlier name of ``AppSettings``.
AppArgs = AppSettings

__all__ = ["AppArgs", "AppSettings", "build_app", "compose_app"]
