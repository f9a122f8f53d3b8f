"""BART's denoising noise as pure, jit-compiled JAX over fixed-shape token batches.

Noise is computed in two steps: `sample_draws` (bart_jax.noise.draws) takes every random choice up
front from per-row `jax.random` keys, then `apply_noise` runs fairseq's DenoisingDataset algorithm
deterministically from those draws. The split lets tests force the draws and compare exactly with a
plain numpy transcription of fairseq (tests/noise_reference.py).

Static shapes: lengths change inside fixed buffers. Deletions compact left and pad the end; insertions
grow into a buffer sized for the worst case; the encoder row has `cfg.source_length` (default: L) slots
and a longer noised row keeps its first S-1 tokens and ends with </s>.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bart_jax.noise import primitives as P
from bart_jax.noise.config import NoiseConfig
from bart_jax.noise.draws import NoiseDraws, NoiseSizes, noise_sizes, sample_draws


def _interior(shape, n):
    """Positions [1, L] and the interior mask [B, L] (between <s> and </s>) for row lengths n [B]."""
    pos = jnp.arange(shape[-1], dtype=jnp.int32)[None, :]
    return pos, (pos >= 1) & (pos <= n[:, None] - 2)


def _fit(x, width: int):
    """Slice or zero-pad the last axis to width."""
    return x[:, :width] if x.shape[1] >= width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def permute_sentences(tokens, n, draws: NoiseDraws, cfg: NoiseConfig):
    """fairseq's permute_sentences: ceil(ratio x #sentences) sentences shuffled among themselves.

    tokens: int32 [B, L]; n: int32 [B] row lengths. A sentence ends after a run of `sentence_end_ids`
    tokens; the last one ends at the document end. Returns int32 [B, L].
    """
    L = tokens.shape[1]
    pos, interior = _interior(tokens.shape, n)
    is_end = jnp.isin(tokens, jnp.asarray(cfg.sentence_end_ids, jnp.int32)) & interior
    next_is_end = jnp.pad(is_end[:, 1:], ((0, 0), (0, 1)))
    boundary = interior & ((is_end & ~next_is_end) | (pos == n[:, None] - 2))
    ends = P.cumsum(boundary)
    num_sentences = ends[:, -1]
    sent_len = P.put_add(L, jnp.where(interior, ends - boundary, L), 1)
    sent_start = 1 + P.cumsum(sent_len) - sent_len
    r = jnp.arange(L, dtype=jnp.int32)[None, :]
    if draws.sentence_select is None:  # ratio 1: every sentence takes part in a random order
        ordering = P.random_order(draws.sentence_shuffle, P.prefix(num_sentences, L))
    else:
        chosen = P.random_order(draws.sentence_select, P.prefix(num_sentences, L))
        num_permuted = P.ceil_ratio(num_sentences, cfg.permute_sentence_ratio)
        shuffle = P.random_order(draws.sentence_shuffle, P.prefix(num_permuted, L))
        # ordering[m] = sentence placed m-th; fairseq: ordering[chosen[r]] = chosen[shuffle[r]], r < k.
        ordering = P.put(L, chosen, jnp.where(r < num_permuted[:, None], P.take(chosen, shuffle), chosen), 0)
    slot_len = P.take(sent_len, ordering)
    slot_start = 1 + P.cumsum(slot_len) - slot_len
    # Each sentence moves by a constant (its new start minus its old start); spread it over the
    # sentence's tokens as a running sum of the changes at sentence starts.
    moved = P.put(L, ordering, slot_start - P.take(sent_start, ordering), 0)
    change = jnp.where(r < num_sentences[:, None], moved - P.shift(moved, 1), 0)
    moved_tokens = P.cumsum(P.put_add(L, jnp.where(r < num_sentences[:, None], sent_start, L), change))
    dest = jnp.where(interior, pos + moved_tokens, pos)
    return P.put(L, dest, tokens, cfg.pad_id)


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


def _earliest_cover_flag(spans):
    """Per word slot: the random flag of the earliest-starting span covering it (fairseq writes span
    tokens offset by offset, so with replace_length -1 the span reaching a token last decides it).

    spans int32 [B, W]: at a span's first word, its length | random flag << 16. Returns bool [B, W]."""
    starts, span_len, flags = spans > 0, spans & 0xFFFF, (spans >> 16) > 0
    w = jnp.arange(spans.shape[1], dtype=jnp.int32)[None, :]
    reach = jax.lax.cummax(jnp.where(starts, w + span_len, 0), axis=1)  # non-decreasing
    search = jax.vmap(partial(jnp.searchsorted, side="right", method="scan"))
    first = search(reach, jnp.broadcast_to(w, reach.shape))
    return P.take(flags, first)


def _span_coverage(word, is_span, first, length, info):
    """Per token: how many spans cover its word, and the `info` a span leaves at its first word.

    A running sum in word space of +1 at a span's first word and -1 after its last (spans running past
    the last word end at </s>, which callers exclude), read by each token through its word number.
    word: int32 [B, L] 1-based word of each token (0 before the first word start); is_span, first
    (0-based first word), length, info: [B, R] per span. Returns (cover, info) int32 [B, L].
    """
    L = word.shape[1]
    edges = jnp.concatenate([jnp.where(is_span, first, L), jnp.where(is_span, first + length, L)], axis=1)
    steps = jnp.concatenate([jnp.ones_like(first), -jnp.ones_like(first)], axis=1)
    per_word = P.cumsum(P.put_add(L, edges, steps))
    info_word = P.put(L, jnp.where(is_span, first, L), info, 0)
    cover = jnp.where(word > 0, P.take(per_word, word - 1), 0)
    return cover, jnp.where(word > 0, P.take(info_word, word - 1), 0)


def whole_word_mask(tokens, n, word_starts, draws: NoiseDraws, cfg: NoiseConfig):
    """fairseq's add_whole_word_mask. Span r starts at the word start of rank r in a random order of
    the row's word starts and covers its word and the next length - 1 words (never </s>);
    replace_length -1 masks every covered token, 0 deletes them, 1 keeps one <mask> (or random
    token) per span start not covered by another span and deletes the rest.

    tokens: int32 [B, L]; n: int32 [B]; word_starts: bool [V]. Returns (int32 [B, L] compacted, new
    lengths [B], inserts owed to zero-length spans [B]).
    """
    L = tokens.shape[1]
    pos, interior = _interior(tokens.shape, n)
    is_start = interior if cfg.mask_length == "subword" else word_starts[tokens] & interior
    word = P.cumsum(is_start)  # 1-based word number of each token; 0 before the first word start
    budget = P.ceil_ratio(word[:, -1], cfg.mask_ratio)
    if cfg.mask_length == "span-poisson":
        lengths, num_spans, num_inserts = span_lengths(draws.span_lengths, budget)
    else:
        lengths, num_spans, num_inserts = None, budget, jnp.zeros_like(budget)
    start = P.random_order(draws.word_order, is_start)  # token slots of the word starts in span order
    start_word = P.take(word, start)
    r = jnp.arange(L, dtype=jnp.int32)[None, :]
    is_span = r < num_spans[:, None]
    length = _fit(lengths, L) if lengths is not None else jnp.ones_like(start)
    randomised = jnp.zeros(start.shape, bool)
    if draws.span_random is not None:
        randomised = _fit(draws.span_random, L) < cfg.random_ratio
    # A span leaves at its first word: 1 | random flag << 1 | its random token << 2 (replace_length 1).
    token_r = _fit(draws.mask_tokens, L) if cfg.replace_length == 1 and draws.mask_tokens is not None else 0
    info = 1 | (randomised.astype(jnp.int32) << 1) | (token_r << 2)
    cover, info = _span_coverage(word, is_span, start_word - 1, length, info)
    info = jnp.where(is_start, info, 0)
    covered = interior & (cover > 0)
    if cfg.replace_length == -1:
        if draws.mask_tokens is None:
            return jnp.where(covered, cfg.mask_id, tokens), n, num_inserts
        # The random choice of the earliest-starting covering span, found in word space.
        spans = P.put(L, jnp.where(is_span, start_word - 1, L), length | (randomised.astype(jnp.int32) << 16), 0)
        flag = P.take(_earliest_cover_flag(spans).astype(jnp.int32), word - 1) > 0
        return jnp.where(covered, jnp.where(flag, draws.mask_tokens, cfg.mask_id), tokens), n, num_inserts
    if cfg.replace_length == 0:
        keep, values = ~covered, tokens
    else:
        kept_start = ((info & 1) > 0) & (cover == 1)  # no other span covers it
        keep = ~covered | kept_start
        values = jnp.where(kept_start, jnp.where((info & 2) > 0, info >> 2, cfg.mask_id), tokens)
    keep = keep & (pos < n[:, None])
    kept = P.cumsum(keep)
    return P.put(L, jnp.where(keep, kept - 1, L), values, cfg.pad_id), kept[:, -1], num_inserts


def insert_tokens(tokens, n, num, order_draws, token_draws, out_length: int, cfg: NoiseConfig):
    """fairseq's add_insertion_noise with a given count: positions 1 + randperm(n + num - 2)[:num] of
    the grown row get <mask>, the first ceil(num x random_ratio) of them (in that random order) a
    random token.

    tokens: int32 [B, Lin]; n, num: int32 [B]; order_draws: uint32 [B, out_length] priorities;
    token_draws: int32 [B, Z >= num] (None when random_ratio is 0), insert r takes token r. Returns
    (int32 [B, out_length], n + num).
    """
    total = n + num
    order = P.random_order(order_draws, P.prefix(total - 2, out_length))
    r = jnp.arange(out_length, dtype=jnp.int32)[None, :]
    new = jnp.full(order.shape, cfg.mask_id, jnp.int32)
    if token_draws is not None:
        is_random = r < P.ceil_ratio(num, cfg.random_ratio)[:, None]
        new = jnp.where(is_random, _fit(token_draws, out_length), cfg.mask_id)
    at = jnp.where(r < num[:, None], order + 1, out_length)
    is_new = P.put(out_length, at, True, False, bool)
    # The kept tokens fill the other positions in order.
    kept = P.take(tokens, P.cumsum(~is_new) - 1)
    out = jnp.where(is_new, P.put(out_length, at, new, cfg.pad_id), kept)
    return jnp.where(r < total[:, None], out, cfg.pad_id), total


def rotate_document(tokens, n, draw, cfg: NoiseConfig):
    """fairseq's add_rolling_noise, with probability rotate_ratio: offset uniform in [1, n-1],
    row -> <s> + x[offset:n-1] + x[1:offset] + </s>. tokens: int32 [B, L]; draw: float32 [B, 2]."""
    pos, interior = _interior(tokens.shape, n)
    interior_len = jnp.maximum(n - 2, 1)[:, None]
    offset = 1 + jnp.minimum(jnp.floor(draw[:, 1] * (n - 1).astype(jnp.float32)).astype(jnp.int32), n - 2)
    rotate = ((draw[:, 0] < cfg.rotate_ratio) & (n > 2))[:, None]
    return P.take(tokens, jnp.where(interior & rotate, 1 + (pos - 2 + offset[:, None]) % interior_len, pos))


def _fit_source(x, n, cfg: NoiseConfig, sizes: NoiseSizes):
    """The encoder row: first S slots; a row longer than S keeps S-1 tokens and ends with </s>."""
    S = sizes.source_length
    x = _fit(jnp.where(jnp.arange(x.shape[1])[None, :] < n[:, None], x, cfg.pad_id), S)
    x = jnp.where((jnp.arange(S)[None, :] == S - 1) & (n[:, None] > S), cfg.eos_id, x)
    return jnp.where(jnp.arange(S)[None, :] < n[:, None], x, cfg.pad_id), jnp.minimum(n, S)


def apply_noise(tokens, word_starts, draws: NoiseDraws, cfg: NoiseConfig):
    """Noise a batch deterministically from its draws, in fairseq's order: sentence permutation ->
    span masking -> insertion -> rotation.

    tokens: int [B, L], rows `<s> text </s>` then pad; word_starts: bool [V]; draws: NoiseDraws for
    these rows. Returns (source int32 [B, S], source length int32 [B]).
    """
    x = jnp.asarray(tokens).astype(jnp.int32)
    sizes = noise_sizes(x.shape[1], cfg)
    n = jnp.sum(x != cfg.pad_id, axis=1).astype(jnp.int32)
    if draws.sentence_shuffle is not None:
        x = permute_sentences(x, n, draws, cfg)
    if cfg.mask_ratio > 0:
        x, n, num_inserts = whole_word_mask(x, n, word_starts, draws, cfg)
        if draws.zero_span_order is not None:
            x, n = insert_tokens(x, n, num_inserts, draws.zero_span_order, draws.zero_span_tokens,
                                 sizes.masked_length, cfg)
    if draws.insert_order is not None:
        num = jnp.where(n >= 2, P.ceil_ratio(n, cfg.insert_ratio), 0)
        x, n = insert_tokens(x, n, num, draws.insert_order, draws.insert_tokens, x.shape[1] + sizes.inserts, cfg)
    if draws.rotate is not None:
        x = rotate_document(x, n, draws.rotate, cfg)
    return _fit_source(x, n, cfg, sizes)


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
    source, n = apply_noise(tokens, word_starts, sample_draws(key, row_ids, L, vocab_size, cfg), cfg)
    return source, (jnp.arange(source.shape[1])[None, :] < n[:, None]).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg",))
def denoising_batch(key, tokens, word_starts, cfg: NoiseConfig, row_ids=None):
    """Model batch for denoising pretraining (the batch contract).

    key: PRNG key (e.g. noise_key(seed, step)); tokens: int [B, L] clean rows `<s> text </s>` + pad;
    word_starts: bool [V], True where a token begins a word; row_ids: optional int [B] noise ids.
    Returns int32 arrays: input_ids/attention_mask [B, S] (noised source), labels [B, L] (clean rows),
    decoder_input_ids/decoder_attention_mask [B, L] from `bart_jax.model.decoder_inputs(labels)`
    (the fine-tuning loader's convention).
    """
    from bart_jax.model import decoder_inputs

    source, source_mask = noise_tokens(key, tokens, word_starts, cfg, row_ids)
    labels = tokens.astype(jnp.int32)
    return {"input_ids": source, "attention_mask": source_mask,
            **decoder_inputs(labels, cfg.pad_id, cfg.decoder_start_id), "labels": labels}
