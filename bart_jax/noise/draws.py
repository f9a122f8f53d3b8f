"""Static sizes and every random choice of the noise, drawn up front from per-row `jax.random` keys.

Row b's draws come from `fold_in(key, row_ids[b])`, so a row's noise depends only on the key (run
seed and step), its row id and its tokens: not on batch size, batch composition, device count or
sharding. Each kind of draw has its own stream (`fold_in(row key, stream)`), so switching a stage on
or off leaves the other stages' draws as they were.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.noise.config import NoiseConfig, span_length_pmf


class NoiseSizes(NamedTuple):
    """Static sizes for rows of length L (Python ints)."""

    length: int  # L: token row length
    max_budget: int  # bound on the span budget ceil(mask_ratio x #word starts)
    span_draws: int  # M: Poisson lengths drawn per row (enough to reach max_budget, see _span_draw_count)
    span_slots: int  # bound on the number of spans (M for span-poisson, max_budget otherwise)
    zero_spans: int  # bound on zero-length spans (inserts owed by span masking)
    inserts: int  # bound on insertion-noise tokens
    masked_length: int  # L1 = L + zero_spans: buffer after span masking and its inserts
    inserted_length: int  # L2 = L1 + inserts: buffer after insertion noise
    source_length: int  # S: encoder length


class NoiseDraws(NamedTuple):
    """All random choices, one row per example (leading axis B); None for stages that are off.

    Priorities are uint32 random bits: a random order takes the valid slots by increasing priority
    (fairseq's randperm). Uniforms are float32 in [0, 1); token draws are ids in [0, vocab) other than
    pad/bos/eos/mask.
    """

    sentence_select: jax.Array | None  # uint32 [B, L]: which sentences are permuted (ratio < 1 only)
    sentence_shuffle: jax.Array | None  # uint32 [B, L]: their new order
    span_lengths: jax.Array | None  # int32 [B, M]: Poisson span lengths, in draw order
    word_order: jax.Array | None  # uint32 [B, L]: per token position; word starts in this order get spans
    span_random: jax.Array | None  # float32 [B, span_slots]: span r gets a random token if < random_ratio
    mask_tokens: jax.Array | None  # int32: per span [B, span_slots] (replace_length 1), per position [B, L] (-1)
    zero_span_order: jax.Array | None  # uint32 [B, L1]: where the inserts owed to zero-length spans go
    zero_span_tokens: jax.Array | None  # int32 [B, zero_spans]: the token of insert r if it is random
    insert_order: jax.Array | None  # uint32 [B, L2]: where insertion noise goes
    insert_tokens: jax.Array | None  # int32 [B, inserts]
    rotate: jax.Array | None  # float32 [B, 2]: (rotate if < rotate_ratio, offset fraction)


def _f32_ceil(count, ratio: float) -> int:
    return int(np.ceil(np.float32(count) * np.float32(ratio)))


def _pmf_moments(poisson_lambda: float) -> tuple[float, float]:
    p = span_length_pmf(poisson_lambda)
    p = p / p.sum()
    k = np.arange(len(p))
    mean = float((k * p).sum())
    return mean, float(((k - mean) ** 2 * p).sum())


def _span_draw_count(max_budget: int, poisson_lambda: float) -> int:
    """Poisson lengths to draw so their sum reaches the budget: mean + 8 standard deviations of the
    renewal count (falling short has probability far below 1e-12; if it happens, the last drawn span
    is lengthened to fill the budget)."""
    mean, var = _pmf_moments(poisson_lambda)
    return int(math.ceil(max_budget / mean + 8.0 * math.sqrt(max_budget * var / mean**3) + 8.0))


def noise_sizes(length: int, cfg: NoiseConfig) -> NoiseSizes:
    """Static sizes for token rows of `length` under `cfg`."""
    if not 2 <= length < 1 << 15:
        raise ValueError(f"token rows must have length in [2, 32768) (<s> and </s> at least); got {length}")
    masking = cfg.mask_ratio > 0
    max_budget = _f32_ceil(length - 2, cfg.mask_ratio) if masking else 0
    poisson = masking and cfg.mask_length == "span-poisson"
    span_draws = _span_draw_count(max_budget, cfg.poisson_lambda) if poisson else 0
    zero_spans = max(span_draws - 1, 0)  # the last used draw is trimmed to a positive length
    masked_length = length + zero_spans
    inserts = _f32_ceil(masked_length, cfg.insert_ratio) if cfg.insert_ratio > 0 else 0
    if masked_length + inserts >= 1 << 15:
        raise ValueError(f"rows of length {length} could grow to {masked_length + inserts} tokens; "
                         "the noise supports up to 32767")
    return NoiseSizes(
        length=length, max_budget=max_budget, span_draws=span_draws,
        span_slots=span_draws if poisson else max_budget, zero_spans=zero_spans, inserts=inserts,
        masked_length=masked_length, inserted_length=masked_length + inserts,
        source_length=cfg.source_length if cfg.source_length is not None else length,
    )


def row_keys(key, row_ids):
    """Typed PRNG keys [B]: fold_in(key, row_ids[b]). key: a typed key or a raw uint32 [2] one."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 key (jax.random.PRNGKey)
        key = jax.random.wrap_key_data(key, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(row_ids))


def sample_draws(key, row_ids, length: int, vocab_size: int, cfg: NoiseConfig) -> NoiseDraws:
    """Every random choice for rows `row_ids` (int [B]) of length `length`; a NoiseDraws, leading B.

    key: PRNG key; random tokens are drawn uniformly from [0, vocab_size) without the special ids.
    Row b depends only on (key, row_ids[b]).
    """
    sizes = noise_sizes(length, cfg)
    keys = row_keys(key, row_ids)

    def per_row(stream: int, draw):
        return jax.vmap(lambda k: draw(jax.random.fold_in(k, stream)))(keys)

    def bits(stream: int, n: int):
        return per_row(stream, lambda k: jax.random.bits(k, (n,), jnp.uint32))

    def uniform(stream: int, n: int):
        return per_row(stream, lambda k: jax.random.uniform(k, (n,), jnp.float32))

    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(cfg.special_ids)).astype(np.int32)

    def tokens(stream: int, n: int):
        return jnp.asarray(allowed)[per_row(stream, lambda k: jax.random.randint(k, (n,), 0, len(allowed)))]

    L = sizes.length
    permute = cfg.permute_sentence_ratio > 0 and len(cfg.sentence_end_ids) > 0
    masking = cfg.mask_ratio > 0
    poisson = masking and cfg.mask_length == "span-poisson"
    randoms = cfg.random_ratio > 0
    replaced = masking and randoms and cfg.replace_length != 0
    zero = poisson and sizes.zero_spans > 0
    insert = cfg.insert_ratio > 0
    span_lengths = None
    if poisson:  # inverse CDF of fairseq's truncated Poisson
        pmf = span_length_pmf(cfg.poisson_lambda)
        cdf = jnp.asarray(np.cumsum(pmf / pmf.sum())[:-1].astype(np.float32))
        span_lengths = jnp.sum(uniform(2, sizes.span_draws)[..., None] >= cdf, axis=-1).astype(jnp.int32)
    return NoiseDraws(
        sentence_select=bits(0, L) if permute and cfg.permute_sentence_ratio < 1.0 else None,
        sentence_shuffle=bits(1, L) if permute else None,
        span_lengths=span_lengths,
        word_order=bits(3, L) if masking else None,
        span_random=uniform(4, max(sizes.span_slots, 1)) if replaced else None,
        mask_tokens=(tokens(5, L if cfg.replace_length == -1 else max(sizes.span_slots, 1))
                     if replaced else None),
        zero_span_order=bits(6, sizes.masked_length) if zero else None,
        zero_span_tokens=tokens(7, sizes.zero_spans) if zero and randoms else None,
        insert_order=bits(8, sizes.inserted_length) if insert else None,
        insert_tokens=tokens(9, sizes.inserts) if insert and randoms else None,
        rotate=uniform(10, 2) if cfg.rotate_ratio > 0 else None,
    )
