"""vtp-ray: the VTP visual tokenizer served with Ray Serve and batch-run with Ray Data."""

__version__ = "0.1.0"

from .replica import VTPReplica

__all__ = ["VTPReplica", "__version__"]
