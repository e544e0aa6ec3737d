"""Ray Serve application for VTP: a FastAPI ingress in front of a dynamically batched model deployment.

``serve run serve_config.yaml`` (or ``serve deploy``) builds it with ``deployments.app:build_app``.
"""

from .app import build_app, compose_app
from .config import AppArgs

__all__ = ["AppArgs", "build_app", "compose_app"]
