"""A plain, per-example numpy transcription of fairseq's DenoisingDataset noise (tests and bench only).

It follows fairseq's control flow (randperm, while loops extending spans token by token, boolean
deletion masks) on one unpadded row at a time. Randomness comes from a `draws` object so the same
algorithm runs either on a numpy Generator (`NumpyDraws`: fairseq's own random calls, for distribution
tests and the bench) or on the draws the jitted kernel consumed (`ForcedDraws`: maps them to the same
choices the kernel makes, for exact comparisons).

The deliberate deviations of bart_jax from fairseq are reproduced here too (they are what we test):
- a sentence ends after a *run* of end-of-sentence ids ("?!" stays with its sentence) and the last one
  at </s> (fairseq ends it after the first id of a run and leaves a one-token last sentence in place);
- random tokens are never pad/bos/eos/mask (fairseq's randint(1, V) can give pad, </s> and <mask>);
- the inserts owed to zero-length spans are exactly their count (fairseq's float round trip
  ceil(len x (count / len)) can add one);
- every count from a ratio is ceil(count x ratio) in float32, as fairseq's span budget is (its
  insertion and permutation counts use float64, which differs on rare products such as 30 x 0.1).
"""

from __future__ import annotations

import numpy as np

from bart_jax.noise.config import NoiseConfig, span_length_pmf


def ceil_f32(count, ratio: float) -> int:
    return int(np.ceil(np.float32(count) * np.float32(ratio)))


class NumpyDraws:
    """fairseq's random calls on a numpy Generator."""

    def __init__(self, rng: np.random.Generator, cfg: NoiseConfig, vocab_size: int):
        self.rng, self.cfg = rng, cfg
        self.allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(cfg.special_ids))
        pmf = span_length_pmf(cfg.poisson_lambda)
        self.pmf = pmf / pmf.sum()

    def permutation(self, name: str, n: int) -> np.ndarray:
        return self.rng.permutation(n)

    def span_lengths(self, n: int) -> np.ndarray:
        return self.rng.choice(len(self.pmf), size=n, p=self.pmf)

    def word_order(self, positions: np.ndarray) -> np.ndarray:
        """fairseq: randperm(#word starts)."""
        return self.rng.permutation(len(positions))

    def uniform(self, name: str, n: int) -> np.ndarray:
        return self.rng.random(n)

    def tokens(self, name: str, which: np.ndarray) -> np.ndarray:
        return self.allowed[self.rng.integers(0, len(self.allowed), size=len(which))]

    def insertions(self, stage: str, population: int, n: int, num_random: int):
        """fairseq: randperm(population)[:n]; the first num_random get random tokens."""
        return self.rng.permutation(population)[:n], np.arange(n) < num_random

    def rotation_offset(self, n: int) -> int:
        return int(self.rng.integers(1, max(1, n - 1) + 1))


class ForcedDraws:
    """The draws of one row as the jitted kernel consumed them (a NoiseDraws of numpy arrays), mapped
    to fairseq's random calls the way the kernel maps them: a random order takes slots by increasing
    priority, ties toward the lower slot."""

    def __init__(self, draws):
        self.d = draws
        self.span_offset = 0

    def permutation(self, name: str, n: int) -> np.ndarray:
        p = getattr(self.d, name)
        if p is None:  # the kernel skips the selection when every sentence is permuted
            return np.arange(n)
        return np.argsort(np.asarray(p, np.uint32)[:n], kind="stable")

    def word_order(self, positions: np.ndarray) -> np.ndarray:
        """The kernel keeps one priority per token position and orders the word starts by it."""
        return np.argsort(np.asarray(self.d.word_order, np.uint32)[positions], kind="stable")

    def span_lengths(self, n: int) -> np.ndarray:
        # Only the draws up to the budget matter, so a short chunk is fine; none left is not.
        out = np.asarray(self.d.span_lengths)[self.span_offset:self.span_offset + n]
        if len(out) == 0:
            raise RuntimeError("forced span-length draws exhausted")
        self.span_offset += len(out)
        return out.astype(np.int64)

    def uniform(self, name: str, n: int) -> np.ndarray:
        return np.asarray(getattr(self.d, name))[:n]

    def tokens(self, name: str, which: np.ndarray) -> np.ndarray:
        return np.asarray(getattr(self.d, name))[which]

    def insertions(self, stage: str, population: int, n: int, num_random: int):
        """As fairseq: randperm(population)[:n], the first num_random of them random tokens."""
        order = np.argsort(np.asarray(getattr(self.d, f"{stage}_order"), np.uint32)[:population], kind="stable")
        return order[:n], np.arange(n) < num_random

    def rotation_offset(self, n: int) -> int:
        u = np.float32(np.asarray(self.d.rotate)[1])
        return 1 + min(int(np.floor(u * np.float32(n - 1))), n - 2)


# ------------------------------------------------------------------------------- fairseq's steps


def permute_sentences(source, cfg: NoiseConfig, draws):
    n = len(source)
    is_end = np.isin(source, cfg.sentence_end_ids)
    is_end[0] = is_end[-1] = False
    # A sentence ends after a run of end ids (j with is_end[j] and not is_end[j+1]) or at n - 2.
    closes = is_end[1:n - 1] & ~is_end[2:n]
    if len(closes):
        closes[-1] = True
    ends = np.flatnonzero(closes) + 2  # exclusive end of each sentence
    num_sentences = len(ends)
    num_to_permute = ceil_f32(num_sentences, cfg.permute_sentence_ratio)
    substitutions = draws.permutation("sentence_select", num_sentences)[:num_to_permute]
    ordering = np.arange(num_sentences)
    ordering[substitutions] = substitutions[draws.permutation("sentence_shuffle", num_to_permute)]
    result = source.copy()
    index = 1
    for i in ordering:
        sentence = source[(ends[i - 1] if i > 0 else 1):ends[i]]
        result[index:index + len(sentence)] = sentence
        index += len(sentence)
    return result


def add_whole_word_mask(source, word_starts, cfg: NoiseConfig, draws):
    if cfg.mask_length == "subword":
        is_word_start = np.ones(len(source), np.int64)
    else:
        is_word_start = np.asarray(word_starts)[source].astype(np.int64)
    is_word_start[0] = 0
    is_word_start[-1] = 0
    num_to_mask = ceil_f32(is_word_start.sum(), cfg.mask_ratio)
    num_inserts = 0
    if num_to_mask == 0:
        return source
    poisson = cfg.mask_length == "span-poisson"
    if poisson:
        lengths = draws.span_lengths(num_to_mask)
        cum_length = np.cumsum(lengths)
        while cum_length[-1] < num_to_mask:
            lengths = np.concatenate([lengths, draws.span_lengths(num_to_mask)])
            cum_length = np.cumsum(lengths)
        i = 0
        while cum_length[i] < num_to_mask:
            i += 1
        lengths[i] = num_to_mask - (0 if i == 0 else cum_length[i - 1])
        num_to_mask = i + 1
        lengths = lengths[:num_to_mask]
        lengths = lengths[lengths > 0]
        num_inserts = num_to_mask - lengths.size
        num_to_mask -= num_inserts
    else:
        lengths = np.ones(num_to_mask, np.int64)
    word_start_positions = np.flatnonzero(is_word_start)
    indices = word_start_positions[draws.word_order(word_start_positions)[:num_to_mask]]
    if cfg.random_ratio > 0 and cfg.replace_length != 0:
        mask_random = draws.uniform("span_random", num_to_mask) < cfg.random_ratio
    else:
        mask_random = np.zeros(num_to_mask, bool)

    source = source.copy()
    to_keep = np.ones(len(source), bool)
    is_word_start[-1] = 255  # a long "length" so spans never run into </s>

    def replace(idx, rnd, which):
        source[idx] = cfg.mask_id
        if rnd.any():
            source[idx[rnd]] = draws.tokens("mask_tokens", which[rnd])

    if cfg.replace_length == 0:
        to_keep[indices] = False
    else:  # the kernel draws one token per span for replace_length 1, one per position for -1
        replace(indices, mask_random, np.arange(len(indices)) if cfg.replace_length == 1 else indices)
    if poisson:
        lengths = lengths - 1
        while indices.size > 0:
            lengths = lengths - is_word_start[indices + 1]
            uncompleted = lengths >= 0
            indices = indices[uncompleted] + 1
            mask_random = mask_random[uncompleted]
            lengths = lengths[uncompleted]
            if cfg.replace_length != -1:
                to_keep[indices] = False
            else:
                replace(indices, mask_random, indices)
    else:
        while indices.size > 0:
            uncompleted = is_word_start[indices + 1] == 0
            indices = indices[uncompleted] + 1
            mask_random = mask_random[uncompleted]
            if cfg.replace_length != -1:
                to_keep[indices] = False
            else:
                replace(indices, mask_random, indices)
    source = source[to_keep]
    if num_inserts > 0:
        source = add_insertion_noise(source, num_inserts, cfg, draws, "zero_span")
    return source


def add_insertion_noise(tokens, n: int, cfg: NoiseConfig, draws, stage: str):
    if n == 0:
        return tokens
    num_tokens = len(tokens)
    num_random = ceil_f32(n, cfg.random_ratio)
    # fairseq: randperm(num_tokens + n - 2)[:n] + 1, the first num_random of them random tokens.
    slots, is_random = draws.insertions(stage, num_tokens + n - 2, n, num_random)
    noise_indices = slots + 1
    noise_mask = np.zeros(num_tokens + n, bool)
    noise_mask[noise_indices] = True
    result = np.full(n + num_tokens, -1, np.int64)
    result[noise_indices[~is_random]] = cfg.mask_id
    if is_random.any():
        result[noise_indices[is_random]] = draws.tokens(f"{stage}_tokens", np.flatnonzero(is_random))
    result[~noise_mask] = tokens
    assert (result >= 0).all()
    return result


def add_rolling_noise(tokens, draws):
    offset = draws.rotation_offset(len(tokens))
    return np.concatenate([tokens[0:1], tokens[offset:-1], tokens[1:offset], tokens[-1:]])


def reference_noise(tokens, word_starts, cfg: NoiseConfig, draws) -> np.ndarray:
    """Noise one unpadded row `<s> ... </s>` in fairseq's order; returns the full noised row."""
    source = np.asarray(tokens, np.int64).copy()
    if cfg.permute_sentence_ratio > 0 and cfg.sentence_end_ids:
        source = permute_sentences(source, cfg, draws)
    if cfg.mask_ratio > 0:
        source = add_whole_word_mask(source, word_starts, cfg, draws)
    if cfg.insert_ratio > 0:
        source = add_insertion_noise(source, ceil_f32(len(source), cfg.insert_ratio), cfg, draws, "insert")
    if cfg.rotate_ratio > 0 and draws.uniform("rotate", 1)[0] < cfg.rotate_ratio:
        source = add_rolling_noise(source, draws)
    return source


def fit_source(source: np.ndarray, length: int, cfg: NoiseConfig) -> np.ndarray:
    """bart_jax's length policy: keep the first length-1 tokens and close with </s>; pad the rest."""
    if len(source) > length:
        source = np.concatenate([source[:length - 1], [cfg.eos_id]])
    return np.concatenate([source, np.full(length - len(source), cfg.pad_id)]).astype(np.int64)


def reference_batch(tokens, word_starts, cfg: NoiseConfig, draws_for_row) -> np.ndarray:
    """Noise each row of tokens [B, L] (padded) with `draws_for_row(b)`; returns sources [B, S]."""
    tokens = np.asarray(tokens)
    length = cfg.source_length or tokens.shape[1]
    rows = []
    for b, row in enumerate(tokens):
        row = row[row != cfg.pad_id]
        rows.append(fit_source(reference_noise(row, word_starts, cfg, draws_for_row(b)), length, cfg))
    return np.stack(rows)


# ------------------------------------------------------------------------------- synthetic data

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
FULL_STOP, BANG = 5, 6  # sentence ends
FIRST_WORD_ID = 7


def make_word_starts(vocab_size: int) -> np.ndarray:
    """A SentencePiece-like table: ids >= 7 begin a word unless id % 3 == 0 (a continuation piece);
    punctuation and specials do not."""
    ids = np.arange(vocab_size)
    return (ids >= FIRST_WORD_ID) & (ids % 3 != 0)


def make_rows(rng: np.random.Generator, batch: int, length: int, vocab_size: int, *, min_len: int = 2,
              end_rate: float = 0.1, full_rate: float = 0.25, distinct: bool = False) -> np.ndarray:
    """Rows `<s> body </s>` then pad, int32 [batch, length]. Bodies are random word ids with sentence
    ends at `end_rate`; `distinct` draws body ids without repetition (needs vocab_size >= length + 7)."""
    out = np.full((batch, length), PAD, np.int32)
    for b in range(batch):
        n = length if rng.random() < full_rate else int(rng.integers(min_len, length + 1))
        if distinct:
            body = rng.permutation(np.arange(FIRST_WORD_ID, vocab_size))[:n - 2]
        else:
            body = rng.integers(FIRST_WORD_ID, vocab_size, size=n - 2)
            ends = rng.random(n - 2) < end_rate
            body[ends] = rng.choice([FULL_STOP, BANG], size=int(ends.sum()))
        out[b, :n] = np.concatenate([[BOS], body, [EOS]])
    return out
