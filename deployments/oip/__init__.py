"""The KServe Open Inference Protocol (V2): one transport-neutral data plane, REST and gRPC adapters over it.
serve_config.yaml's ``grpc_options.grpc_servicer_functions`` names ``deployments.oip.add_inference_service``."""

from .grpc_service import add_inference_service

__all__ = ["add_inference_service"]
