"""Ray Data jobs over image sets: one pipeline, one spec, a model stage and a writer per job.

Every job runs ``source -> read + preprocess (CPU tasks) -> model stage (replica actors) -> writer (driver)``:

- ``sources/``: what a job reads (loose files, webdataset tar shards, parquet image bytes; locations, labels), each
  source's Ray Data read ending in the preprocess stage.
- ``spec``: ``PipelineSpec``, the settings every job shares: ``Preprocessing`` (size, crop, limits, fast),
  ``SampleOptions``, batching, placement; and ``ModelFacts``, read from the model's config.
- ``stages``: the torch-free preprocess stage, block sizing and the Arrow views of its rows.
- ``worker``: ``ModelStage``, the model stage's base class (one replica, a ``VTPReplica``, per actor).
- ``runner``: the Ray session, placement, the replica stage and the output iteration every job runs through.
- ``store``: the resumable parquet output of ``tokenize`` (``LatentStore``, with extension points for other
  layouts); ``latent_stats``: ``ChannelStats``, latent statistics that merge exactly.
- ``report``: eval reports, their summary line, loading one back, comparing two.
- ``jobs/``: one module per job (``tokenize``, ``lightningdit``, ``evaluate``, ``zeroshot``, ``decode``).

Nothing here imports torch at module level: Ray Data's preprocess tasks import this package too.
"""

from .runner import ReplicaStartError
from .spec import ModelFacts, PipelineSpec, Preprocessing, SampleOptions

__all__ = ["ModelFacts", "PipelineSpec", "Preprocessing", "ReplicaStartError", "SampleOptions"]
