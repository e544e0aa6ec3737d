"""Class labels as integer class indices: what the jobs that need classes (zero-shot, lightningdit) read from a
sample's label text (the ``cls`` member of a webdataset sample, a parquet ``label`` column), and why a sample has
none (``NoLabel``, ``BadLabel``: error rows with their own reasons)."""

from __future__ import annotations

from ..spec import SampleOptions
from ..stages import Refused

__all__ = ["BadLabel", "NoLabel", "class_id"]


class NoLabel(Refused):
    """A sample without the class label its job needs."""

    reason = "no_label"


class BadLabel(Refused):
    """A sample whose label is not an integer class index (in range)."""

    reason = "bad_label"


def class_id(label: str | None, options: SampleOptions, name: str = "label") -> int:
    """The integer class index a sample's ``label`` text holds; ``NoLabel`` / ``BadLabel`` say why there is none.

    ``name`` says where the label came from (``cls member``, ``label column``), for the error message; the index
    must be below ``options.num_classes`` when that is set.
    """
    text = (label or "").strip()
    if not text:
        raise NoLabel(f"no class label ({name})")
    if not text.isascii() or not text.isdigit() or int(text) >= 2**63:
        raise BadLabel(f"label {label!r} ({name}) is not an integer class index")
    value = int(text)
    if options.num_classes is not None and value >= options.num_classes:
        raise BadLabel(f"label {value} ({name}) is not a class index 0..{options.num_classes - 1}")
    return value
