"""Linear probing, upstream VTP's third evaluation, on Ray Train (``vtp-ray eval --task linear-probe``).

- ``settings``: ``ProbeSettings``, the protocol's numbers (upstream's by default), the heads and the cosine schedule.
- ``transforms``: torchvision's RandomResizedCrop + flip and Resize + CenterCrop, with Pillow and numpy.
- ``data``: the train / val sets, the endless shuffled training stream cut into epochs, the datasets.
- ``reads``: the read tasks: images (folders, shards, parquet bytes) decoded and transformed, or stored features.
- ``heads``: the probe's features of the frozen trunk, the linear heads, one SGD step of them all (torch).
- ``worker``: the Ray Train worker loop: features, DDP over the heads, evaluation, checkpoints, progress.
- ``features``: the fast mode's extraction of the features, once, by a pool of ``VTPReplica`` actors.
- ``job``: the driver: placement of the workers, the datasets, the ``TorchTrainer``, the report.

Nothing here imports torch at module level except ``heads`` (and ``worker`` / ``features`` inside their workers).
"""

from .settings import MODES, UPSTREAM_LEARNING_RATES, Head, ProbeSettings

__all__ = ["MODES", "UPSTREAM_LEARNING_RATES", "Head", "ProbeSettings"]
