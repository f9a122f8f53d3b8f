"""Small text and shape helpers shared by the input pipelines, decoding, ROUGE and the lead baseline.

Kept apart from `loader` so that decoding and scoring do not import grain.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# Text is cut where a sentence ends (., ! or ? then whitespace) or at a line break.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (whitespace-trimmed, non-empty), split at line breaks and after . ! ?."""
    return [s for s in (p.strip() for p in _SENTENCE_BREAK.split(text)) if s]


def as_text(value) -> str:
    """A dataset value as str: TFDS Text features read back as UTF-8 bytes (or a 0-d bytes/object array)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        value = value.item()
    if isinstance(value, bytes):  # np.bytes_ included
        return bytes(value).decode("utf-8")
    return str(value)


def bucket_boundaries(max_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths for bucketing: powers of two from `smallest` below max_len, then max_len."""
    bounds, b = [], smallest
    while b < max_len:
        bounds.append(b)
        b *= 2
    return tuple(bounds) + (max_len,)


def padded_length(length: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary that holds `length` tokens (ValueError when none does)."""
    for b in boundaries:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {boundaries[-1]}")
