"""Ray Data jobs over image sets: one pipeline, one spec, a model stage and a writer per job.

- ``inputs``: which images a job reads (directories, globs, manifests; local or any pyarrow URI).
- ``spec``: ``PipelineSpec``, the settings every job shares, and ``ModelFacts``, read from the model's config.
- ``stages``: the torch-free read + preprocess stage and the Arrow views of its rows.
- ``worker``: ``ReplicaWorker``, the model stage's base class (one ``VTPReplica`` per actor).
- ``runner``: the Ray session, placement, dataset and output iteration every job runs through.
- ``tokenize`` + ``store``: ``vtp-ray tokenize`` and its resumable parquet output.
- ``evaluate`` + ``report``: ``vtp-ray eval``, its report and the comparison of two reports.

Nothing here imports torch at module level: Ray Data's preprocess tasks import this package too.
"""

from .runner import ReplicaStartError
from .spec import ModelFacts, PipelineSpec, Preprocessing, SampleOptions

__all__ = ["ModelFacts", "PipelineSpec", "Preprocessing", "ReplicaStartError", "SampleOptions"]
