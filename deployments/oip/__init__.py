"""The KServe Open Inference Protocol (V2): ``dataplane`` (what every transport answers), ``tensors`` (its tensors
and the binary extension), ``rest`` (``/v2`` routes) and ``grpc_service`` (``inference.GRPCInferenceService`` behind
Serve's gRPC proxy). serve_config.yaml's ``grpc_options.grpc_servicer_functions`` names
``deployments.oip.add_inference_service``."""

from .grpc_service import add_inference_service

__all__ = ["add_inference_service"]
