"""The servicer function's path in configs written before ``deployments.oip`` existed (kept so they run unchanged):
``grpc_servicer_functions: [deployments.oip_grpc.add_inference_service]``."""

from .oip.grpc_service import add_inference_service

__all__ = ["add_inference_service"]
