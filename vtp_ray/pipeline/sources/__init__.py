"""What a pipeline reads, one format per module (loose files, webdataset tar shards, parquet image bytes) over
shared location and label helpers. Every source has ``read(spec, cpus)``: its Ray Data read and preprocess stage,
the rows the model stage takes. No module here imports torch: they run in Ray Data's read tasks.
"""

from .files import Inputs, discover_inputs
from .find import find_samples, find_source
from .labels import BadLabel, NoLabel, class_id
from .locations import InputError, resolve_location
from .parquet import ParquetSource
from .samples import SampleSource, sample_sort_key, source_of
from .webdataset import ShardSource

__all__ = [
    "BadLabel",
    "InputError",
    "Inputs",
    "NoLabel",
    "ParquetSource",
    "SampleSource",
    "ShardSource",
    "class_id",
    "discover_inputs",
    "find_samples",
    "find_source",
    "resolve_location",
    "sample_sort_key",
    "source_of",
]
