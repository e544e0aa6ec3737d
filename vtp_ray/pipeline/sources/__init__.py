"""What a pipeline reads, each format in its own module, each read ending in the shared preprocess stage.

- ``locations``: local paths and URIs, globs, listings, reading bytes (``resolve_location``, ``InputError``).
- ``files``: loose image files named by directories, globs and manifests (``discover_inputs`` -> ``Inputs``).
- ``samples``: what the formats that hold many samples per file share (``SampleSource``, sample identities).
- ``webdataset``: tar shards (``ShardSource``); ``parquet``: parquet files with image bytes (``ParquetSource``).
- ``labels``: integer class labels (``class_id``, ``NoLabel``, ``BadLabel``).
- ``find``: which of them a job's inputs name (``find_source``, ``find_samples``).

Every source has ``read(spec, cpus)``: its Ray Data read and preprocess stage, the rows the model stage takes. No
module here imports torch: they run in Ray Data's read tasks.
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
