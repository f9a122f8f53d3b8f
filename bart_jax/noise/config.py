"""Configuration of BART's denoising noise: a frozen dataclass (a static jit argument) and presets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MASK_LENGTHS = ("subword", "word", "span-poisson")
REPLACE_LENGTHS = (-1, 0, 1)
SENTENCE_SPLITS = ("punctuation", "full_stop")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """BART's corruptions, applied in fairseq's order: sentence permutation -> span masking ->
    insertion -> rotation. Field names follow fairseq's options (`random_ratio` is `--mask-random`).

    - mask_ratio: fraction of word starts whose words are masked (span budget = ceil(ratio x #word starts)).
    - random_ratio: fraction of masked spans (and of inserted tokens) that get a random token, not <mask>.
    - insert_ratio: inserted tokens = ceil(ratio x current length).
    - rotate_ratio: probability of rotating the document.
    - permute_sentence_ratio: fraction of sentences that are shuffled among themselves.
    - replace_length: -1 one <mask> per masked token, 0 delete masked tokens, 1 one <mask> per span.
    - mask_length: 'subword' (every token is a word start), 'word' (word starts from the tokenizer),
      'span-poisson' (span lengths in words ~ Poisson(poisson_lambda), truncated as fairseq does).
    - sentence_end_ids: token ids that end a sentence; a run of them closes one sentence and the
      document end closes the last. Empty: the document is one sentence. Training derives them from the
      tokenizer by `sentence_split` unless they are given.
    - sentence_split: which tokens the tokenizer reports as sentence ends. 'punctuation' (default): every
      token made only of '.', '!', '?' (with or without a leading space). 'full_stop': only the bare '.'
      token, as fairseq's BART recipe does (it splits at GPT-2 id 13, `full_stop_index =
      vocab.index("13")`, never at '!', '?', ' .' or '...'); use it to reproduce that recipe exactly.
    - pad_id/bos_id/eos_id/mask_id: special ids. Random tokens are drawn uniformly from
      [0, vocab_size) minus these four (None: vocab_size = len(word_starts)).
    - source_length: encoder length S (None: the length L of the token rows). A noised source longer
      than S (insertions) keeps its first S-1 tokens and is closed by </s>.
    - decoder_start_id: BART starts the decoder with </s>.
    """

    mask_ratio: float = 0.3
    random_ratio: float = 0.1
    insert_ratio: float = 0.0
    rotate_ratio: float = 0.0
    permute_sentence_ratio: float = 1.0
    replace_length: int = 1
    mask_length: str = "span-poisson"
    poisson_lambda: float = 3.5
    sentence_end_ids: tuple[int, ...] = ()
    sentence_split: str = "punctuation"
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    mask_id: int = 4
    vocab_size: int | None = None
    source_length: int | None = None
    decoder_start_id: int = 2

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"NoiseConfig.{field}={getattr(self, field)!r}: {why}")

        for f in ("mask_ratio", "random_ratio", "insert_ratio", "rotate_ratio", "permute_sentence_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
                bad(f, "must be a number in [0, 1]")
        if self.replace_length not in REPLACE_LENGTHS or isinstance(self.replace_length, bool):
            bad("replace_length", f"expected one of {REPLACE_LENGTHS}")
        if self.sentence_split not in SENTENCE_SPLITS:
            bad("sentence_split", f"expected one of {SENTENCE_SPLITS}")
        if self.mask_length not in MASK_LENGTHS:
            bad("mask_length", f"expected one of {MASK_LENGTHS}")
        if self.mask_length == "subword" and self.replace_length == -1:
            # As fairseq: with subword spans of one token, use replace_length 1 (or 0).
            bad("replace_length", "mask_length='subword' needs replace_length 0 or 1")
        if self.mask_length == "span-poisson" and not (
                isinstance(self.poisson_lambda, (int, float)) and 0.0 < self.poisson_lambda <= 16.0):
            # fairseq cuts the pmf after the first value below 1e-7; past ~16.1 nothing but k=0 is left.
            bad("poisson_lambda", "must be in (0, 16]")
        ids = {}
        for f in ("pad_id", "bos_id", "eos_id", "mask_id", "decoder_start_id"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(f, "must be a non-negative integer")
            if f != "decoder_start_id":
                if v in ids:
                    bad(f, f"equals {ids[v]}; special ids must differ")
                ids[v] = f
        if not isinstance(self.sentence_end_ids, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.sentence_end_ids):
            bad("sentence_end_ids", "must be a tuple of non-negative integer token ids")
        for i in self.sentence_end_ids:
            if i in ids:
                bad("sentence_end_ids", f"contains the special id {i} ({ids[i]})")
        if self.vocab_size is not None and (
                isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                or self.vocab_size <= max(ids)):
            bad("vocab_size", f"must be None or an integer > every special id ({max(ids)})")
        if self.source_length is not None and (
                isinstance(self.source_length, bool) or not isinstance(self.source_length, int)
                or self.source_length < 2):
            bad("source_length", "must be None or an integer >= 2")

    def replace(self, **changes) -> "NoiseConfig":
        return dataclasses.replace(self, **changes)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids random replacements never produce, sorted."""
        return tuple(sorted({self.pad_id, self.bos_id, self.eos_id, self.mask_id}))


def span_length_pmf(poisson_lambda: float) -> np.ndarray:
    """Poisson(lambda) probabilities for k = 0, 1, ..., cut as fairseq does: after the first k whose
    probability is below 1e-7 (that k included), at most 128 values; float64, not renormalised
    (sampling normalises)."""
    ps, term = [], math.exp(-poisson_lambda)
    for k in range(128):
        ps.append(term)
        if term < 1e-7:
            break
        term *= poisson_lambda / (k + 1)
    return np.asarray(ps, dtype=np.float64)


# The BART paper's large-model recipe (fairseq's published pretraining command) is the default.
# The single-noise presets reproduce Table 1's rows; ratios the paper leaves open use the recipe's 30 %
# and the paper's lambda = 3 (section 2.2), with no random replacements so each row is one noise only.
_TABLE1 = dict(mask_ratio=0.0, random_ratio=0.0, insert_ratio=0.0, rotate_ratio=0.0,
               permute_sentence_ratio=0.0, poisson_lambda=3.0)
NOISE_PRESETS: dict[str, NoiseConfig] = {
    "bart_large": NoiseConfig(),
    "token_masking": NoiseConfig(**{**_TABLE1, "mask_ratio": 0.3, "mask_length": "word", "replace_length": -1}),
    "token_deletion": NoiseConfig(**{**_TABLE1, "mask_ratio": 0.3, "mask_length": "word", "replace_length": 0}),
    "text_infilling": NoiseConfig(**{**_TABLE1, "mask_ratio": 0.3, "mask_length": "span-poisson",
                                     "replace_length": 1}),
    "document_rotation": NoiseConfig(**{**_TABLE1, "rotate_ratio": 1.0}),
    "sentence_shuffling": NoiseConfig(**{**_TABLE1, "permute_sentence_ratio": 1.0}),
    "infilling_shuffling": NoiseConfig(**{**_TABLE1, "mask_ratio": 0.3, "mask_length": "span-poisson",
                                          "replace_length": 1, "permute_sentence_ratio": 1.0}),
}


def noise_preset(name: str, **overrides) -> NoiseConfig:
    """A named preset with field overrides, e.g. `noise_preset('bart_large', sentence_end_ids=(5, 6))`."""
    if name not in NOISE_PRESETS:
        raise ValueError(f"unknown noise preset {name!r}; expected one of {sorted(NOISE_PRESETS)}")
    names = {f.name for f in dataclasses.fields(NoiseConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown NoiseConfig field(s) {unknown}")
    return dataclasses.replace(NOISE_PRESETS[name], **overrides)
