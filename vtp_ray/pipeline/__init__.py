"""Ray Data jobs over image sets: one pipeline, one spec, a model stage and a writer per job.

Every job runs ``source -> read + preprocess (CPU tasks) -> model stage (replica actors) -> writer (driver)``: the
sources (``sources/``), the spec (``PipelineSpec``: ``Preprocessing``, ``SampleOptions``, batching, placement), the
preprocess stage, placement and the run are shared; each job (``jobs/``) adds its model stage and its writer.
ARCHITECTURE.md lists every module. Nothing here imports torch at module level: Ray Data's preprocess tasks import
this package too.
"""

from .runner import ReplicaStartError
from .spec import ModelFacts, PipelineSpec, Preprocessing, SampleOptions

__all__ = ["ModelFacts", "PipelineSpec", "Preprocessing", "ReplicaStartError", "SampleOptions"]
