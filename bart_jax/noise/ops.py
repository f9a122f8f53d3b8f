"""BART's denoising noise as pure, jit-compiled JAX over fixed-shape token batches.

Noise is computed in two steps: `sample_draws` takes every random choice up front (a `NoiseDraws` of
fixed-shape arrays, one row per example), then `apply_noise` runs fairseq's DenoisingDataset algorithm
deterministically from those draws. The split lets tests force the draws and compare exactly with a
plain numpy transcription of fairseq (tests/noise_reference.py), and makes each row's noise a function
of (key, row id, row) only, so results do not depend on batch size, composition, device count or
sharding.

Static shapes: lengths change inside fixed buffers. Deletions compact left and pad the end; insertions
grow into a buffer sized for the worst case; the encoder row has `cfg.source_length` (default: L) slots
and a longer noised row keeps its first S-1 tokens and ends with </s>.

Speed (the noise runs beside the train step, often on the host CPU; XLA's CPU backend pays a few
microseconds per kernel and is slow at gathers with computed indices) comes from:
- fairseq's randperm as a sort of random 32-bit priorities whose low bits are replaced by the slot
  index (one single-operand sort; ties in the remaining random bits break toward the lower slot, a
  bias of order 2**-23 per pair);
- sorting only what matters: the few sentences of a row (at most `sentence_cap`) and the word starts
  whose priority is under a threshold that keeps the K smallest with overwhelming probability. A batch
  where a row breaks these bounds reruns through the exact full-sort pipeline (`lax.cond`), which
  computes the same result;
- Floyd's algorithm for the few inserted tokens (no sort);
- span coverage as a running sum of +1/-1 at span edges in word space, read by each token with one gather;
- gathers/scatters on the flattened batch and float32-matmul cumulative sums;
- random bits from a keyed counter hash (seeded per row from the key's threefry words and the row id),
  a few integer operations per word instead of threefry's twenty rounds.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.noise import primitives as P
from bart_jax.noise.config import NoiseConfig, span_length_pmf


class NoiseSizes(NamedTuple):
    """Static sizes for rows of length L (Python ints)."""

    length: int  # L: token row length
    max_budget: int  # bound on the span budget ceil(mask_ratio x #word starts)
    span_draws: int  # M: Poisson lengths drawn per row (enough to reach max_budget, see _span_draw_count)
    span_slots: int  # bound on the number of spans (M for span-poisson, max_budget otherwise)
    longest_span: int  # longest span length a draw can give (1 unless span-poisson)
    zero_spans: int  # bound on zero-length spans (inserts owed by span masking)
    inserts: int  # bound on insertion-noise tokens
    masked_length: int  # L1 = L + zero_spans: buffer after span masking and its inserts
    inserted_length: int  # L2 = L1 + inserts: buffer after insertion noise
    source_length: int  # S: encoder length
    sentence_cap: int  # fast path: rows with at most this many sentences
    word_cap: int  # fast path: candidate word starts sorted per row
    zero_span_cap: int  # fast path: zero-length spans (inserts) per row


class NoiseDraws(NamedTuple):
    """All random choices, one row per example (leading axis B); None for stages that are off.

    Priorities are uint32 (smaller = earlier in the random order, as fairseq's randperm); uniforms are
    float32 in [0, 1); token draws are ids in [0, vocab) other than pad/bos/eos/mask.
    """

    sentence_select: jax.Array | None  # uint32 [B, L]: which sentences are permuted (ratio < 1 only)
    sentence_shuffle: jax.Array | None  # uint32 [B, L]: their new order
    span_lengths: jax.Array | None  # int32 [B, M]: Poisson span lengths, in draw order
    word_order: jax.Array | None  # uint32 [B, L]: per token position; word starts in this order get spans
    span_random: jax.Array | None  # float32 [B, span_slots]: span r gets random tokens if < random_ratio
    mask_tokens: jax.Array | None  # int32: per span [B, span_slots] (replace_length 1), per position [B, L] (-1)
    zero_span_slots: jax.Array | None  # float32 [B, zero_spans]: Floyd draws placing zero-length spans
    zero_span_random: jax.Array | None  # float32 [B, zero_spans]: Floyd draws choosing the random ones
    zero_span_tokens: jax.Array | None  # int32 [B, zero_spans]: token of insert i if random
    insert_slots: jax.Array | None  # float32 [B, inserts]: Floyd draws placing insertion noise
    insert_random: jax.Array | None  # float32 [B, inserts]
    insert_tokens: jax.Array | None  # int32 [B, inserts]
    rotate: jax.Array | None  # float32 [B, 2]: (rotate if < rotate_ratio, offset fraction)


# ---------------------------------------------------------------------------------------- sizes


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


def _candidate_cap(expected: float, limit: int) -> int:
    """Static candidate buffer for about `expected` smallest priorities: candidates are ~Binomial with
    mean candidate_count(k); the cap leaves 5 standard deviations of room."""
    mean = expected + 5.0 * math.sqrt(expected) + 10.0
    return max(1, min(limit, int(math.ceil(mean + 5.0 * math.sqrt(mean) + 8.0))))


def _zero_span_cap(zero_spans: int, poisson_lambda: float) -> int:
    """Fast-path bound on a row's zero-length spans: at most `zero_spans` draws, each zero with fairseq's
    truncated-Poisson probability; mean + 6 standard deviations + 6 (a row exceeds it with probability
    below 1e-9 at the paper's lambda, and such a batch reruns exactly)."""
    p = span_length_pmf(poisson_lambda)
    p0 = float(p[0] / p.sum())
    mean = zero_spans * p0
    return max(1, min(zero_spans, int(math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - p0)) + 6.0))))


def index_bits(width: int) -> int:
    """Low priority bits that hold the slot index of a `width`-slot random order."""
    return max(1, (width - 1).bit_length())


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
    # Spans at full length: about budget / mean span length.
    spans = max_budget / _pmf_moments(cfg.poisson_lambda)[0] if poisson else max_budget
    return NoiseSizes(
        length=length, max_budget=max_budget, span_draws=span_draws,
        span_slots=span_draws if poisson else max_budget,
        longest_span=len(span_length_pmf(cfg.poisson_lambda)) - 1 if poisson else 1,
        zero_spans=zero_spans, inserts=inserts, masked_length=masked_length,
        inserted_length=masked_length + inserts,
        source_length=cfg.source_length if cfg.source_length is not None else length,
        sentence_cap=min(length, max(64, length // 8)),
        word_cap=_candidate_cap(spans, length),
        zero_span_cap=_zero_span_cap(zero_spans, cfg.poisson_lambda) if poisson else 0,
    )


# -------------------------------------------------------------------------------------- draws


def row_seeds(key, row_ids):
    """uint32 [B, 2] per-row seeds: a keyed hash of the row id under the key's two threefry words
    (bijective in the row id, so distinct rows never share a seed)."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 key (jax.random.PRNGKey)
        key = jax.random.wrap_key_data(key, impl="threefry2x32")
    k0, k1 = jax.random.key_data(key).astype(jnp.uint32)
    ids = jnp.asarray(row_ids).astype(jnp.uint32)
    return jnp.stack([P.hash_words(ids, k0, k1), P.hash_words(ids, k1 ^ jnp.uint32(0x9E3779B9), k0)], axis=1)


def sample_draws(key, row_ids, length: int, vocab_size: int, cfg: NoiseConfig) -> NoiseDraws:
    """Every random choice for rows `row_ids` (int [B]) of length `length`; a NoiseDraws, leading B.

    key: PRNG key; random tokens are drawn from [0, vocab_size) without the special ids (noise_tokens
    passes cfg.vocab_size, else len(word_starts)). Row b depends only on (key, row_ids[b]).
    """
    sizes = noise_sizes(length, cfg)
    bits = partial(P.stream_bits, row_seeds(key, row_ids))
    L = sizes.length
    permute = cfg.permute_sentence_ratio > 0 and len(cfg.sentence_end_ids) > 0
    masking = cfg.mask_ratio > 0
    poisson = masking and cfg.mask_length == "span-poisson"
    randoms = cfg.random_ratio > 0
    replaced = masking and randoms and cfg.replace_length != 0
    zero = poisson and sizes.zero_spans > 0
    insert = cfg.insert_ratio > 0
    tokens = partial(P.random_tokens, vocab_size=vocab_size, excluded=cfg.special_ids)
    span_lengths = None
    if poisson:  # inverse CDF of fairseq's truncated Poisson
        pmf = span_length_pmf(cfg.poisson_lambda)
        cdf = jnp.asarray(np.cumsum(pmf / pmf.sum())[:-1].astype(np.float32))
        u = P.uniform(bits(2, sizes.span_draws))
        span_lengths = jnp.sum(u[..., None] >= cdf, axis=-1).astype(jnp.int32)
    return NoiseDraws(
        sentence_select=bits(0, L) if permute and cfg.permute_sentence_ratio < 1.0 else None,
        sentence_shuffle=bits(1, L) if permute else None,
        span_lengths=span_lengths,
        word_order=bits(3, L) if masking else None,
        span_random=P.uniform(bits(4, max(sizes.span_slots, 1))) if replaced else None,
        mask_tokens=(tokens(bits(5, L if cfg.replace_length == -1 else max(sizes.span_slots, 1)))
                     if replaced else None),
        zero_span_slots=P.uniform(bits(6, sizes.zero_spans)) if zero else None,
        zero_span_random=P.uniform(bits(7, sizes.zero_spans)) if zero and randoms else None,
        zero_span_tokens=tokens(bits(8, sizes.zero_spans)) if zero and randoms else None,
        insert_slots=P.uniform(bits(9, sizes.inserts)) if insert else None,
        insert_random=P.uniform(bits(10, sizes.inserts)) if insert and randoms else None,
        insert_tokens=tokens(bits(11, sizes.inserts)) if insert and randoms else None,
        rotate=P.uniform(bits(12, 2)) if cfg.rotate_ratio > 0 else None,
    )


# -------------------------------------------------------------------------------------- stages


def _interior(shape, n):
    """Positions [1, L] and the interior mask [B, L] (between <s> and </s>) for row lengths n [B]."""
    pos = jnp.arange(shape[-1], dtype=jnp.int32)[None, :]
    return pos, (pos >= 1) & (pos <= n[:, None] - 2)


def _fit(x, width: int):
    """Slice or zero-pad the last axis to width."""
    return x[:, :width] if x.shape[1] >= width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def permute_sentences(tokens, n, draws: NoiseDraws, cfg: NoiseConfig, sizes: NoiseSizes, fast: bool):
    """fairseq's permute_sentences: ceil(ratio x #sentences) sentences shuffled among themselves.

    tokens: int32 [B, L]; n: int32 [B] row lengths. A sentence ends after a run of `sentence_end_ids`
    tokens; the last one ends at the document end. The fast path handles up to `sentence_cap`
    sentences per row. Returns (int32 [B, L], ok bool [B]).
    """
    L = tokens.shape[1]
    cap = sizes.sentence_cap if fast else L
    bits = index_bits(L)
    pos, interior = _interior(tokens.shape, n)
    is_end = jnp.zeros(tokens.shape, bool)
    for i in cfg.sentence_end_ids:
        is_end = is_end | (tokens == i)
    is_end = is_end & interior
    next_is_end = jnp.pad(is_end[:, 1:], ((0, 0), (0, 1)))
    boundary = interior & ((is_end & ~next_is_end) | (pos == n[:, None] - 2))
    ends = P.cumsum(boundary)
    num_sentences = ends[:, -1]
    sent_len = P.put_add(cap, jnp.where(interior, ends - boundary, cap), 1)
    sent_start = 1 + P.cumsum(sent_len) - sent_len
    r = jnp.arange(cap, dtype=jnp.int32)[None, :]
    if draws.sentence_select is None:  # ratio 1: every sentence takes part in a random order
        ordering = P.random_order(draws.sentence_shuffle[:, :cap], P.prefix(num_sentences, cap), bits)
    else:
        chosen = P.random_order(draws.sentence_select[:, :cap], P.prefix(num_sentences, cap), bits)
        num_permuted = P.ceil_ratio(num_sentences, cfg.permute_sentence_ratio)
        shuffle = P.random_order(draws.sentence_shuffle[:, :cap], P.prefix(num_permuted, cap), bits)
        # ordering[m] = sentence placed m-th; fairseq: ordering[chosen[r]] = chosen[shuffle[r]], r < k.
        ordering = P.put(cap, chosen, jnp.where(r < num_permuted[:, None], P.take(chosen, shuffle), chosen), 0)
    slot_len = P.take(sent_len, ordering)
    slot_start = 1 + P.cumsum(slot_len) - slot_len
    # Each sentence moves by a constant (its new start minus its old start); spread it over the
    # sentence's tokens as a running sum of the changes at sentence starts.
    moved = P.put(cap, ordering, slot_start - P.take(sent_start, ordering), 0)
    change = jnp.where(r < num_sentences[:, None], moved - P.shift(moved, 1), 0)
    moved_tokens = P.cumsum(P.put_add(L, jnp.where(r < num_sentences[:, None], sent_start, L), change))
    dest = jnp.where(interior, pos + moved_tokens, pos)
    return P.put(L, dest, tokens, cfg.pad_id), num_sentences <= cap


def span_lengths(drawn, budget):
    """fairseq's budget rule: lengths are drawn until their sum reaches `budget`, the last is cut to
    fit, zero-length spans become insertions.

    drawn: int32 [B, M] lengths in draw order; budget: int32 [B]. Returns (lengths int32 [B, M]: the
    positive lengths in draw order then zeros, num_spans [B], num_inserts [B]).
    """
    M = drawn.shape[1]
    idx = jnp.arange(M, dtype=jnp.int32)[None, :]
    cum = P.cumsum(drawn)
    budget = budget[:, None]
    last = jnp.minimum(jnp.sum(cum < budget, axis=1, keepdims=True), M - 1)  # reaches the budget
    before = jnp.where(last > 0, P.take(cum, last - 1), 0)
    lengths = jnp.where(idx < last, drawn, jnp.where(idx == last, budget - before, 0))
    used = (idx <= last) & (budget > 0)
    positive = used & (lengths > 0)
    slot = P.cumsum(positive) - 1
    num_spans = slot[:, -1] + 1
    num_inserts = jnp.where(budget[:, 0] > 0, last[:, 0] + 1 - num_spans, 0)
    return P.put(M, jnp.where(positive, slot, M), lengths, 0), num_spans, num_inserts


def _word_starts(tokens, n, word_starts, cfg: NoiseConfig):
    _, interior = _interior(tokens.shape, n)
    return interior if cfg.mask_length == "subword" else word_starts[tokens] & interior


def _earliest_cover_flag(spans, longest: int, exact: bool):
    """Per word slot: the random flag of the earliest-starting span covering it (fairseq writes span
    tokens offset by offset, so with replace_length -1 the span reaching a token last decides it).

    spans int32 [B, W]: at a span's first word, its length | random flag << 16. The fast form looks
    back `longest` words. Returns (bool [B, W], ok [B])."""
    W = spans.shape[1]
    starts, span_len, flags = spans > 0, spans & 0xFFFF, (spans >> 16) > 0
    if exact:
        w = jnp.arange(W, dtype=jnp.int32)[None, :]
        reach = jax.lax.cummax(jnp.where(starts, w + span_len, 0), axis=1)  # non-decreasing
        first = jax.vmap(partial(jnp.searchsorted, side="right", method="scan"))(
            reach, jnp.broadcast_to(w, reach.shape))
        return P.take(flags, first), jnp.ones(spans.shape[0], bool)
    out = jnp.zeros_like(flags)
    found = jnp.zeros_like(starts)
    for d in reversed(range(longest)):  # larger offset = earlier start
        reach = P.shift(starts & (span_len > d), d)
        out = jnp.where(reach & ~found, P.shift(flags, d), out)
        found = found | reach
    return out, jnp.max(span_len, axis=1) <= longest


def whole_word_mask(tokens, n, word_starts, draws: NoiseDraws, cfg: NoiseConfig, sizes: NoiseSizes, fast: bool):
    """fairseq's add_whole_word_mask. Span r starts at the word start of rank r in a random order of
    the row's word starts and covers its word and the next length - 1 words (never </s>);
    replace_length -1 masks every covered token, 0 deletes them, 1 keeps one <mask> (or random
    token) per span start not covered by another span and deletes the rest.

    tokens: int32 [B, L]; n: int32 [B]; word_starts: bool [V]. The fast path sorts only candidate
    word starts. Returns (int32 [B, L] compacted, new lengths [B], inserts owed to zero-length spans
    [B], ok [B]).
    """
    L = tokens.shape[1]
    pos, interior = _interior(tokens.shape, n)
    is_start = _word_starts(tokens, n, word_starts, cfg)
    word = P.cumsum(is_start)  # 1-based word number of each token; 0 before the first word start
    num_words = word[:, -1]
    budget = P.ceil_ratio(num_words, cfg.mask_ratio)
    if cfg.mask_length == "span-poisson":
        lengths, num_spans, num_inserts = span_lengths(draws.span_lengths, budget)
    else:
        lengths, num_spans, num_inserts = None, budget, jnp.zeros_like(budget)
    if fast:
        start, start_word, ok = P.smallest_order(draws.word_order, is_start, num_words, num_spans,
                                                 sizes.word_cap, index_bits(L), payload=word)
    else:
        start = P.random_order(draws.word_order, is_start, index_bits(L))
        start_word, ok = P.take(word, start), jnp.ones(n.shape, bool)
    R = start.shape[1]
    r = jnp.arange(R, dtype=jnp.int32)[None, :]
    is_span = r < num_spans[:, None]
    length = _fit(lengths, R) if lengths is not None else jnp.ones_like(start)
    randomised = jnp.zeros(start.shape, bool)
    if draws.span_random is not None:
        randomised = _fit(draws.span_random, R) < cfg.random_ratio
    # Coverage in word space: a running sum of +1 at a span's first word and -1 after its last (spans
    # running past the last word end at </s>, which `interior` excludes). The same scatter leaves at
    # each span's first word: 1 | random flag << 1 | its random token << 2 (replace_length 1). Tokens
    # then read their word's entry (one gather; a token-space scatter of span ends cost more).
    first = start_word - 1  # 0-based word slot of each span's first word
    edges = jnp.concatenate([jnp.where(is_span, first, L), jnp.where(is_span, first + length, L)], axis=1)
    info = jnp.zeros_like(start)
    if cfg.replace_length == 1:
        token_r = _fit(draws.mask_tokens, R) if draws.mask_tokens is not None else jnp.zeros_like(start)
        info = 1 | (randomised.astype(jnp.int32) << 1) | (token_r << 2)
    change = jnp.stack([jnp.concatenate([jnp.ones_like(start), -jnp.ones_like(start)], axis=1),
                        jnp.concatenate([info, jnp.zeros_like(info)], axis=1)], axis=-1)
    at_edges = P.put_add_columns(L, edges, change)  # [B, word slot, (edge sum, info)]
    per_word = jnp.stack([P.cumsum(at_edges[..., 0]), at_edges[..., 1]], axis=-1)
    per_token = P.take_columns(per_word, word - 1)
    cover = jnp.where(word > 0, per_token[..., 0], 0)
    info = jnp.where(is_start, per_token[..., 1], 0)
    covered = interior & (cover > 0)
    if cfg.replace_length == -1:
        if draws.mask_tokens is None:
            return jnp.where(covered, cfg.mask_id, tokens), n, num_inserts, ok
        # The random choice of the earliest-starting covering span, found in word space.
        spans = P.put(L, jnp.where(is_span, start_word - 1, L),
                      length | (randomised.astype(jnp.int32) << 16), 0)
        flags, good = _earliest_cover_flag(spans, sizes.longest_span, exact=not fast)
        flag = P.take(flags.astype(jnp.int32), word - 1) > 0
        new = jnp.where(flag, draws.mask_tokens, cfg.mask_id)
        return jnp.where(covered, new, tokens), n, num_inserts, ok & good
    if cfg.replace_length == 0:
        keep, values = ~covered, tokens
    else:
        kept_start = ((info & 1) > 0) & (cover == 1)  # no other span covers it
        keep = ~covered | kept_start
        values = jnp.where(kept_start, jnp.where((info & 2) > 0, info >> 2, cfg.mask_id), tokens)
    keep = keep & (pos < n[:, None])
    kept = P.cumsum(keep)
    return P.put(L, jnp.where(keep, kept - 1, L), values, cfg.pad_id), kept[:, -1], num_inserts, ok


def insert_tokens(tokens, n, num, slot_draws, random_draws, token_draws, out_length: int, cfg: NoiseConfig):
    """fairseq's add_insertion_noise with a given count: `num` <mask>/random tokens at uniformly random
    interior positions of the grown row (Floyd's algorithm); ceil(num x random_ratio) of them, chosen
    uniformly, are random tokens.

    tokens: int32 [B, Lin]; n, num: int32 [B] (num <= Z); slot_draws, random_draws: float32 [B, Z]
    Floyd uniforms; token_draws: int32 [B, Z] (None when random_ratio is 0). Returns
    (int32 [B, out_length], n + num).
    """
    total = n + num
    picks = P.floyd(slot_draws, jnp.maximum(total - 2, 0), num)  # interior slot q is position q + 1
    Z = picks.shape[1]
    new = jnp.full(picks.shape, cfg.mask_id, jnp.int32)
    if token_draws is not None:
        chosen = P.floyd(random_draws, num, P.ceil_ratio(num, cfg.random_ratio))
        new = jnp.where(P.put(Z, chosen, True, False, bool), token_draws, cfg.mask_id)
    # Inserts in position order (position << 16 | draw index; unused draws last).
    r = jnp.arange(Z, dtype=jnp.int32)[None, :]
    ordered = jnp.sort(jnp.where(picks >= 0, (picks + 1) << 16, out_length << 16) | r, axis=-1)
    at, new = ordered >> 16, P.take(new, ordered & 0xFFFF)
    # Kept token i moves right by the inserts before it: the r-th insert (in position order)
    # precedes the kept tokens from index at[r] - r on.
    pushed = P.cumsum(P.put_add(out_length, jnp.where(at < out_length, at - r, out_length), 1))
    i = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    dest = jnp.where(i < n[:, None], i + pushed[:, :tokens.shape[1]], out_length)
    out = P.put(out_length, jnp.concatenate([dest, at], axis=1), jnp.concatenate([tokens, new], axis=1),
                cfg.pad_id)
    return out, total


def rotate_document(tokens, n, draw, cfg: NoiseConfig):
    """fairseq's add_rolling_noise, with probability rotate_ratio: offset uniform in [1, n-1],
    row -> <s> + x[offset:n-1] + x[1:offset] + </s>. tokens: int32 [B, L]; draw: float32 [B, 2]."""
    pos, interior = _interior(tokens.shape, n)
    interior_len = jnp.maximum(n - 2, 1)[:, None]
    offset = 1 + jnp.minimum(jnp.floor(draw[:, 1] * (n - 1).astype(jnp.float32)).astype(jnp.int32), n - 2)
    rotate = ((draw[:, 0] < cfg.rotate_ratio) & (n > 2))[:, None]
    return P.take(tokens, jnp.where(interior & rotate, 1 + (pos - 2 + offset[:, None]) % interior_len, pos))


def _noise(tokens, word_starts, draws: NoiseDraws, cfg: NoiseConfig, sizes: NoiseSizes, fast: bool):
    """The whole pipeline; the fast form reports per row whether its shortcuts held (ok)."""
    n = jnp.sum(tokens != cfg.pad_id, axis=1).astype(jnp.int32)
    x, ok = tokens, jnp.ones(n.shape, bool)
    if draws.sentence_shuffle is not None:
        x, good = permute_sentences(x, n, draws, cfg, sizes, fast)
        ok = ok & good
    if cfg.mask_ratio > 0:
        x, n, num_inserts, good = whole_word_mask(x, n, word_starts, draws, cfg, sizes, fast)
        ok = ok & good
        if draws.zero_span_slots is not None:
            zero_draws = (draws.zero_span_slots, draws.zero_span_random, draws.zero_span_tokens)
            width = sizes.masked_length
            if fast:  # a few inserts per row: Floyd's picks are a prefix of its draws, so cut them short
                cap = sizes.zero_span_cap
                ok = ok & (num_inserts <= cap)
                num_inserts = jnp.minimum(num_inserts, cap)
                zero_draws = tuple(None if d is None else d[:, :cap] for d in zero_draws)
                width = sizes.length + cap
            x, n = insert_tokens(x, n, num_inserts, *zero_draws, width, cfg)
    if draws.insert_slots is not None:
        num = jnp.where(n >= 2, P.ceil_ratio(n, cfg.insert_ratio), 0)
        x, n = insert_tokens(x, n, num, draws.insert_slots, draws.insert_random, draws.insert_tokens,
                             x.shape[1] + sizes.inserts, cfg)
    if draws.rotate is not None:
        x = rotate_document(x, n, draws.rotate, cfg)
    S = sizes.source_length
    x = _fit(jnp.where(jnp.arange(x.shape[1])[None, :] < n[:, None], x, cfg.pad_id), S)
    x = jnp.where((jnp.arange(S)[None, :] == S - 1) & (n[:, None] > S), cfg.eos_id, x)
    x = jnp.where(jnp.arange(S)[None, :] < n[:, None], x, cfg.pad_id)
    return x, jnp.minimum(n, S), ok


def _noise_with_fallback(tokens, word_starts, make_draws, cfg: NoiseConfig):
    """The fast pipeline, and the exact one where a row broke a shortcut (same result). The exact
    branch makes its own draws, so the fast one only computes the draws it reads (a prefix of the
    sentence priorities, ...); selecting outside the conditional keeps XLA from moving the fast
    pipeline into it."""
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    sizes = noise_sizes(tokens.shape[1], cfg)
    x, n, ok = _noise(tokens, word_starts, make_draws(), cfg, sizes, True)
    redo = ~jnp.all(ok)
    x_exact, n_exact = jax.lax.cond(
        redo, lambda: _noise(tokens, word_starts, make_draws(), cfg, sizes, False)[:2],
        lambda: (jnp.zeros_like(x), jnp.zeros_like(n)))
    return jnp.where(redo, x_exact, x), jnp.where(redo, n_exact, n)


def apply_noise(tokens, word_starts, draws: NoiseDraws, cfg: NoiseConfig, force_exact: bool = False):
    """Noise a batch deterministically from its draws, in fairseq's order: sentence permutation ->
    span masking -> insertion -> rotation.

    tokens: int [B, L], rows `<s> text </s>` then pad; word_starts: bool [V]; draws: NoiseDraws for
    these rows. force_exact runs only the exact pipeline (same result; for tests). Returns
    (source int32 [B, S], source length int32 [B]).
    """
    if force_exact:
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        return _noise(tokens, word_starts, draws, cfg, noise_sizes(tokens.shape[1], cfg), False)[:2]
    return _noise_with_fallback(tokens, word_starts, lambda: draws, cfg)


# ---------------------------------------------------------------------------------------- batch


@partial(jax.jit, static_argnums=0)
def noise_key(seed: int, step):
    """The noise key of training step `step` for run seed `seed` (threefry, identical everywhere)."""
    return jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), step)


def _vocab_size(tokens, word_starts, cfg: NoiseConfig) -> int:
    if not isinstance(cfg, NoiseConfig):
        raise ValueError(f"cfg must be a NoiseConfig, got {type(cfg).__name__}")
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, length]; got {tokens.dtype}{tokens.shape}")
    if word_starts.ndim != 1 or word_starts.dtype != jnp.bool_:
        raise ValueError(f"word_starts must be a bool array [vocab_size]; got {word_starts.dtype}"
                         f"{word_starts.shape}")
    vocab_size = cfg.vocab_size if cfg.vocab_size is not None else word_starts.shape[0]
    if vocab_size <= max(cfg.special_ids):
        raise ValueError(f"vocab_size {vocab_size} (len(word_starts) unless cfg.vocab_size is set) must "
                         f"exceed every special id {cfg.special_ids}")
    return vocab_size


@partial(jax.jit, static_argnames=("cfg",))
def noise_tokens(key, tokens, word_starts, cfg: NoiseConfig, row_ids=None):
    """Noise a batch; row b's randomness is fold_in(key, row_ids[b]) (default b).

    key: PRNG key; tokens: int [B, L] rows `<s> text </s>` then pad; word_starts: bool [V];
    row_ids: int [B] or None. Returns (source int32 [B, S], source_mask int32 [B, S]).
    """
    vocab_size = _vocab_size(tokens, word_starts, cfg)
    B, L = tokens.shape
    if row_ids is None:
        row_ids = jnp.arange(B, dtype=jnp.int32)
    source, n = _noise_with_fallback(tokens, word_starts,
                                     lambda: sample_draws(key, row_ids, L, vocab_size, cfg), cfg)
    return source, (jnp.arange(source.shape[1])[None, :] < n[:, None]).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg",))
def denoising_batch(key, tokens, word_starts, cfg: NoiseConfig, row_ids=None):
    """Model batch for denoising pretraining (the batch contract).

    key: PRNG key (e.g. noise_key(seed, step)); tokens: int [B, L] clean rows `<s> text </s>` + pad;
    word_starts: bool [V], True where a token begins a word; row_ids: optional int [B] noise ids.
    Returns int32 arrays: input_ids/attention_mask [B, S] (noised source), labels [B, L] (clean rows),
    decoder_input_ids = shift_tokens_right(labels) and decoder_attention_mask = labels != pad [B, L].
    """
    from bart_jax.model import shift_tokens_right

    source, source_mask = noise_tokens(key, tokens, word_starts, cfg, row_ids)
    labels = tokens.astype(jnp.int32)
    return {
        "input_ids": source,
        "attention_mask": source_mask,
        "decoder_input_ids": shift_tokens_right(labels, cfg.pad_id, cfg.decoder_start_id),
        "decoder_attention_mask": (labels != cfg.pad_id).astype(jnp.int32),
        "labels": labels,
    }
