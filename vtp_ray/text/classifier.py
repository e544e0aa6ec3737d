"""Zero-shot classifiers: one text embedding per class from prompt templates (numpy on the replica's results)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .prompts import check_templates, expand

__all__ = ["average_templates", "class_embeddings"]


def class_embeddings(
    embed_text: Callable[[Sequence[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
    classes_per_call: int = 32,
) -> np.ndarray:
    """The classifier ``(C, D)``: per class, the mean of its normalized template embeddings, renormalized.

    ``embed_text`` maps texts to L2-normalized embeddings (``VTPReplica.embed_text``); it is called on the prompts
    of ``classes_per_call`` classes at a time, which bounds memory for 1000 classes x 80 templates.
    """
    templates = check_templates(templates)
    if not classnames:
        raise ValueError("classnames must not be empty")
    parts = []
    for start in range(0, len(classnames), classes_per_call):
        names = classnames[start : start + classes_per_call]
        parts.append(average_templates(embed_text(expand(names, templates)), len(templates)))
    return np.concatenate(parts)


def average_templates(embedded: np.ndarray, templates: int) -> np.ndarray:
    """Label-major prompt embeddings ``(C * T, D)`` (as ``prompts.expand`` orders them) -> ``(C, D)``: the mean of
    each class's T normalized embeddings, renormalized."""
    means = embedded.reshape(-1, templates, embedded.shape[-1]).mean(axis=1)
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
