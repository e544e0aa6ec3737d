"""Zero-shot classifiers: one text embedding per class from prompt templates (numpy on the replica's results)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .prompts import check_templates, expand

__all__ = ["ProgressLine", "average_templates", "class_embeddings"]


def class_embeddings(
    embed_text: Callable[[Sequence[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
    classes_per_call: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The classifier ``(C, D)``: per class, the mean of its normalized template embeddings, renormalized.

    ``embed_text`` maps texts to L2-normalized embeddings (``VTPReplica.embed_text``); it is called on the prompts
    of ``classes_per_call`` classes at a time, which bounds memory for 1000 classes x 80 templates. ``progress`` is
    told ``(classes done, classes)`` after each call.
    """
    templates = check_templates(templates)
    if not classnames:
        raise ValueError("classnames must not be empty")
    parts = []
    for start in range(0, len(classnames), classes_per_call):
        names = classnames[start : start + classes_per_call]
        parts.append(average_templates(embed_text(expand(names, templates)), len(templates)))
        if progress is not None:
            progress(start + len(names), len(classnames))
    return np.concatenate(parts)


class ProgressLine:
    """``progress`` for ``class_embeddings``: one line about every ``every_s`` seconds with an estimate of what is
    left, written with ``write`` (a worker's ``print`` reaches the job's console through Ray)."""

    def __init__(self, what: str, every_s: float = 10.0, write: Callable[[str], None] = print) -> None:
        self.what, self.every_s, self.write = what, every_s, write
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < total:
            return
        self.last = now
        left = (now - self.started) / done * (total - done)
        self.write(f"{self.what}: {done}/{total} classes, {now - self.started:.0f} s so far, about {left:.0f} s left")


def average_templates(embedded: np.ndarray, templates: int) -> np.ndarray:
    """Label-major prompt embeddings ``(C * T, D)`` (as ``prompts.expand`` orders them) -> ``(C, D)``: the mean of
    each class's T normalized embeddings, renormalized."""
    means = embedded.reshape(-1, templates, embedded.shape[-1]).mean(axis=1)
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
