"""Ray Serve application for VTP: a FastAPI ingress in front of a dynamically batched model deployment.

``serve run serve_config.yaml`` (or ``serve deploy``) builds it with ``deployments.app:build_app``. Modules:
``config`` (the application's arguments), ``ingress`` (HTTP: validation, decoding, encoding), ``inputs`` (request
parsing), ``schemas`` (JSON bodies), ``protocol`` (what ingress and replicas exchange), ``replica`` (the model
deployment), ``batching`` (its admission gate), ``metrics``, ``app`` (the builder). Importing the package does not
import torch: only the model replicas load it.
"""

from .app import build_app, compose_app
from .config import AppArgs

__all__ = ["AppArgs", "build_app", "compose_app"]
