"""Counts in words, for progress lines and summaries (no dependencies: the Ray-free commands use it too)."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 error``, ``2 errors``, ``3 classes``."""
    ending = "es" if noun.endswith(("s", "x", "ch", "sh")) else "s"
    return f"{count} {noun}{'' if count == 1 else ending}"
