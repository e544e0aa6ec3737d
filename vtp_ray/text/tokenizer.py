"""OpenAI CLIP's BPE tokenizer as upstream VTP uses it, from open_clip (which ships ``bpe_simple_vocab_16e6``).

open_clip's ``SimpleTokenizer`` is the implementation upstream's own tokenizer reproduces: ftfy text fixing, HTML
unescaping, whitespace cleaning, lower-casing, start id 49406 and end id 49407, zero padding, and a text longer
than the context cut so that its last id is the end token. The vocabulary comes with the package: nothing is
downloaded. open_clip imports torch, so this module is only imported where the model runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TEXT_INSTALL", "VOCAB_SIZE", "MissingTextDependencyError", "available", "tokenize"]


TEXT_INSTALL = "pip install 'vtp-ray[text]'"
#: Token ids of OpenAI CLIP's BPE vocabulary: a text tower with fewer cannot embed tokenized text.
VOCAB_SIZE = 49408


class MissingTextDependencyError(ImportError):
    """The CLIP tokenizer's package (open_clip) is not installed here."""


def available() -> bool:
    """Whether the text verbs can run in this environment (open_clip installed)."""
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None


@functools.cache
def _tokenizer() -> Any:  # open_clip's SimpleTokenizer, imported here: open_clip imports torch
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise MissingTextDependencyError(f"the CLIP text verbs need open_clip: {TEXT_INSTALL}") from e
    return SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    """``texts`` -> int64 token ids ``(N, context_length)``, zero-padded."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
    return _tokenizer()(list(texts), context_length=context_length).numpy()
