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

__all__ = ["tokenize"]


@functools.cache
def _tokenizer() -> Any:  # open_clip's SimpleTokenizer, imported here: open_clip imports torch
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    """``texts`` -> int64 token ids ``(N, context_length)``, zero-padded."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
    return _tokenizer()(list(texts), context_length=context_length).numpy()
