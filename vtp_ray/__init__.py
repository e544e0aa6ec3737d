"""vtp-ray: the VTP visual tokenizer served with Ray Serve and batch-run with Ray Data."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .replica import VTPReplica

__all__ = ["VTPReplica", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: processes that only preprocess images (Ray Data's preprocess tasks) never load torch.
    if name == "VTPReplica":
        from .replica import VTPReplica

        return VTPReplica
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
