"""Invariants, exact agreement with the numpy transcription of fairseq, and the batch contract of
bart_jax.noise (statistics live in test_noise_stats.py)."""

from __future__ import annotations

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noise_reference as R
from bart_jax.noise import (
    NOISE_PRESETS,
    NoiseConfig,
    apply_noise,
    denoising_batch,
    noise_key,
    noise_preset,
    noise_sizes,
    noise_tokens,
    sample_draws,
    span_length_pmf,
)
from bart_jax.noise import ops
from bart_jax.noise import primitives as P
from bart_jax.noise.draws import row_keys

V, B, L = 96, 96, 40
WORD_STARTS = R.make_word_starts(V)
ENDS = (R.FULL_STOP, R.BANG)
SPECIALS = (R.BOS, R.PAD, R.EOS, R.MASK)


def config(name: str, **overrides) -> NoiseConfig:
    return noise_preset(name, sentence_end_ids=ENDS, mask_id=R.MASK, **overrides)


# text_infilling and infilling_shuffling are bart_large without random tokens (resp. shuffling):
# their fields are pinned in test_presets and their code paths are all exercised below.
CONFIGS = {name: config(name) for name in NOISE_PRESETS if name not in ("text_infilling", "infilling_shuffling")}
CONFIGS.update({
    # every noise at once, with many zero-length spans (lambda 1) and insertions pushing rows past
    # the encoder length
    "everything": config("bart_large", insert_ratio=0.2, rotate_ratio=0.5, permute_sentence_ratio=0.5,
                         poisson_lambda=1.0, source_length=L + 4),
    # one <mask> per token with random spans: overlapping spans take the earliest start's choice
    "random_token_masking": config("token_masking", mask_length="span-poisson", random_ratio=0.3),
    "subword": config("bart_large", mask_length="subword"),
    "deletion_random_insert": config("token_deletion", random_ratio=0.3, insert_ratio=0.2),
})
_sample = jax.jit(sample_draws, static_argnums=(2, 3, 4))
_apply = jax.jit(apply_noise, static_argnums=(3,))


@functools.lru_cache(maxsize=None)
def rows(seed: int = 0, length: int = L, batch: int = B, distinct: bool = False) -> np.ndarray:
    return R.make_rows(np.random.default_rng(seed), batch, length, V if not distinct else 256,
                       distinct=distinct)


@functools.lru_cache(maxsize=None)
def noised(name: str, step: int = 0):
    """(tokens, source, mask) for CONFIGS[name] on the shared rows, via the public jitted entry."""
    tokens = rows()
    source, mask = noise_tokens(noise_key(0, step), jnp.asarray(tokens), jnp.asarray(WORD_STARTS),
                                CONFIGS[name], row_ids=jnp.arange(B))
    return tokens, np.asarray(source), np.asarray(mask)


def forced_reference(tokens, cfg: NoiseConfig, draws) -> np.ndarray:
    draws = jax.tree.map(np.asarray, draws)
    return R.reference_batch(tokens, WORD_STARTS, cfg,
                             lambda b: R.ForcedDraws(jax.tree.map(lambda a: a[b], draws)))


def lengths(mask) -> np.ndarray:
    return np.asarray(mask).sum(axis=1)


def sentences(row) -> list[tuple[int, ...]]:
    """Interior sentences of an unpadded row: a sentence ends after a run of end ids, or at </s>."""
    body = list(row[1:-1])
    out, current = [], []
    for i, tok in enumerate(body):
        current.append(int(tok))
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (tok in ENDS and nxt not in ENDS) or nxt is None:
            out.append(tuple(current))
            current = []
    return out


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [
    ("mask_ratio", 1.5), ("random_ratio", -0.1), ("insert_ratio", 2.0), ("rotate_ratio", "0.5"),
    ("permute_sentence_ratio", 1.01), ("replace_length", 2), ("mask_length", "sentence"),
    ("poisson_lambda", 0.0), ("poisson_lambda", 20.0), ("mask_id", 2), ("pad_id", -1),
    ("sentence_end_ids", (5, 2)), ("sentence_end_ids", [5]), ("vocab_size", 4), ("source_length", 1),
    ("sentence_split", "comma"),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"NoiseConfig.{field}"):
        NoiseConfig(**{field: value})


def test_subword_spans_need_replace_length_0_or_1():
    with pytest.raises(ValueError, match="replace_length"):
        NoiseConfig(mask_length="subword", replace_length=-1)


def test_presets():
    assert set(NOISE_PRESETS) == {"bart_large", "token_masking", "token_deletion", "text_infilling",
                                  "document_rotation", "sentence_shuffling", "infilling_shuffling"}
    large = noise_preset("bart_large")
    assert large == NoiseConfig()
    assert (large.mask_ratio, large.random_ratio, large.poisson_lambda, large.replace_length,
            large.permute_sentence_ratio, large.rotate_ratio, large.insert_ratio,
            large.mask_length) == (0.3, 0.1, 3.5, 1, 1.0, 0.0, 0.0, "span-poisson")
    active = {name: {f for f in ("mask_ratio", "random_ratio", "insert_ratio", "rotate_ratio",
                                 "permute_sentence_ratio") if getattr(cfg, f) > 0}
              for name, cfg in NOISE_PRESETS.items()}
    assert active["token_masking"] == active["token_deletion"] == active["text_infilling"] == {"mask_ratio"}
    assert active["document_rotation"] == {"rotate_ratio"}
    assert active["sentence_shuffling"] == {"permute_sentence_ratio"}
    assert active["infilling_shuffling"] == {"mask_ratio", "permute_sentence_ratio"}
    assert NOISE_PRESETS["token_masking"].replace_length == -1
    assert NOISE_PRESETS["token_deletion"].replace_length == 0
    assert NOISE_PRESETS["text_infilling"].mask_length == "span-poisson"
    assert noise_preset("text_infilling", mask_id=7).mask_id == 7
    with pytest.raises(ValueError, match="unknown noise preset"):
        noise_preset("bert")
    with pytest.raises(ValueError, match="unknown NoiseConfig field"):
        noise_preset("bart_large", mask_prob=0.1)


def test_span_length_pmf_is_cut_like_fairseq():
    pmf = span_length_pmf(3.5)
    k = np.arange(len(pmf))
    expected = np.exp(-3.5) * 3.5**k / np.array([math.factorial(i) for i in k], float)
    np.testing.assert_allclose(pmf, expected, rtol=1e-12)
    assert pmf[-1] < 1e-7 <= pmf[-2]


# --------------------------------------------------------------------------- exact agreement


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_fairseq_transcription_on_the_same_draws(name):
    cfg = CONFIGS[name]
    tokens, source, mask = noised(name)
    draws = _sample(noise_key(0, 0), jnp.arange(B), L, V, cfg)
    expected = forced_reference(tokens, cfg, draws)
    np.testing.assert_array_equal(source, expected)
    np.testing.assert_array_equal(lengths(mask), (expected != cfg.pad_id).sum(axis=1))


def test_matches_fairseq_on_rows_with_many_sentences_and_more_budget_than_span_draws():
    length = 160
    cfg = config("infilling_shuffling")
    tokens = np.full((4, length), R.PAD, np.int32)
    body = np.tile([10, R.FULL_STOP], (length - 2) // 2)  # 79 two-token sentences
    tokens[0, :length] = np.concatenate([[R.BOS], body, [R.EOS]])
    # a row of full length with more budget than span draws: the reference draws in budget-size chunks
    words = np.random.default_rng(0).choice(np.flatnonzero(WORD_STARTS), length - 2)
    tokens[1, :length] = np.concatenate([[R.BOS], words, [R.EOS]])
    assert math.ceil(0.3 * WORD_STARTS[tokens[1]].sum()) > noise_sizes(length, cfg).span_draws
    tokens[2:, :22] = np.concatenate([[R.BOS], np.arange(20, 40), [R.EOS]])
    draws = _sample(noise_key(3, 1), jnp.arange(4), length, V, cfg)
    source, _ = _apply(jnp.asarray(tokens), jnp.asarray(WORD_STARTS), draws, cfg)
    expected = forced_reference(tokens, cfg, draws)
    np.testing.assert_array_equal(np.asarray(source), expected)
    assert not np.array_equal(expected[0], tokens[0])


def test_matches_fairseq_on_a_row_with_many_zero_length_spans():
    length = 160
    cfg = config("text_infilling", random_ratio=0.5)
    sizes = noise_sizes(length, cfg)
    many = sizes.span_draws // 2  # leading zero-length draws: many inserts
    assert many + 8 <= sizes.span_draws
    tokens = rows(seed=5, length=length, batch=3)
    draws = _sample(noise_key(4, 2), jnp.arange(3), length, V, cfg)
    span_lengths = np.array(draws.span_lengths)
    span_lengths[0, :many] = 0
    span_lengths[0, many:] = np.maximum(span_lengths[0, many:], 6)
    draws = draws._replace(span_lengths=jnp.asarray(span_lengths))
    source, _ = _apply(jnp.asarray(tokens), jnp.asarray(WORD_STARTS), draws, cfg)
    expected = forced_reference(tokens, cfg, draws)
    np.testing.assert_array_equal(np.asarray(source), expected)
    assert (expected[0] == R.MASK).sum() + np.isin(expected[0], tokens[0], invert=True).sum() > many


def hand_draws(cfg: NoiseConfig, length: int, **fields):
    """Draws for one row, every field zero-ish, then the given fields (numpy arrays) set."""
    base = _sample(noise_key(0, 0), jnp.arange(1), length, V, cfg)
    base = jax.tree.map(lambda a: jnp.zeros_like(a), base)
    return base._replace(**{k: jnp.asarray(v)[None] for k, v in fields.items()})


def order(*first, size: int):
    """Priorities making `first` the first slots of the random order (the rest after, in index order).
    Word starts are ordered by the priority at their first token's position."""
    p = np.full(size, 0xFFFF0000, np.uint32)
    for rank, slot in enumerate(first):
        p[slot] = (rank + 1) << 20
    return p


WORDY = np.zeros(V, bool)
WORDY[[10, 20, 30, 40, 50, 60]] = True  # word starts; 11 and 12 continue words


HAND_CONFIGS = {
    "infilling": config("text_infilling", random_ratio=0.5),
    "deletion": config("token_deletion"),
    "masking": config("token_masking"),
    "moves": config("sentence_shuffling", rotate_ratio=1.0),
}


@pytest.mark.parametrize("case", ["infilling", "zero_span_insert", "random_span", "deletion", "token_masking",
                                  "rotation", "shuffle"])
def test_hand_made_cases(case):
    # words: [10 11] [20] [30 12 .] [40] [50] [60]; one sentence end after 12
    row = np.array([R.BOS, 10, 11, 20, 30, 12, R.FULL_STOP, 40, 50, 60, R.EOS], np.int32)
    length = 12
    tokens = np.full((1, length), R.PAD, np.int32)
    tokens[0, :len(row)] = row
    m = R.MASK
    if case in ("infilling", "zero_span_insert", "random_span"):
        cfg = HAND_CONFIGS["infilling"]  # budget ceil(6 words x 0.3) = 2
        sizes = noise_sizes(length, cfg)
        lengths = np.full(sizes.span_draws, 2)
        no_random = np.ones(sizes.span_slots, np.float32)
        if case == "infilling":  # one 2-word span from word 2: one <mask> for [20] [30 12 .]
            draws = hand_draws(cfg, length, span_lengths=lengths, word_order=order(3, size=length),
                               span_random=no_random)
            expected = [R.BOS, 10, 11, m, 40, 50, 60, R.EOS]
        elif case == "zero_span_insert":  # draws 0, 2: the zero-length span becomes an insert
            lengths[0] = 0
            draws = hand_draws(cfg, length, span_lengths=lengths, word_order=order(7, size=length),
                               # slot 8 comes first: the insert goes to position 9 of the grown row
                               span_random=no_random, zero_span_order=order(8, size=sizes.masked_length),
                               zero_span_tokens=np.full(sizes.zero_spans, 70, np.int32))
            # the 2-word span [40] [50] -> <mask>; ceil(1 insert x 0.5) = 1 random insert: token 70
            expected = [R.BOS, 10, 11, 20, 30, 12, R.FULL_STOP, m, 60, 70, R.EOS]
        else:  # the span gets the random token drawn for it (span 0)
            random_tokens = np.full(sizes.span_slots, 77, np.int32)
            random_tokens[0] = 88
            draws = hand_draws(cfg, length, span_lengths=lengths, word_order=order(3, size=length),
                               span_random=np.zeros(sizes.span_slots, np.float32), mask_tokens=random_tokens)
            expected = [R.BOS, 10, 11, 88, 40, 50, 60, R.EOS]
    elif case == "deletion":  # two whole words deleted: words 3 and 1 (first tokens at 4 and 1)
        cfg = HAND_CONFIGS["deletion"]
        draws = hand_draws(cfg, length, word_order=order(4, 1, size=length))
        expected = [R.BOS, 20, 40, 50, 60, R.EOS]
    elif case == "token_masking":
        cfg = HAND_CONFIGS["masking"]
        draws = hand_draws(cfg, length, word_order=order(1, 4, size=length))
        expected = [R.BOS, m, m, 20, m, m, m, 40, 50, 60, R.EOS]
    elif case == "rotation":  # sentences kept in order; offset = 1 + floor(0.5 x 10) = 6
        cfg = HAND_CONFIGS["moves"]
        draws = hand_draws(cfg, length, sentence_shuffle=order(0, 1, size=length),
                           rotate=np.array([0.0, 0.5], np.float32))
        expected = [R.BOS, R.FULL_STOP, 40, 50, 60, 10, 11, 20, 30, 12, R.EOS]
    else:  # two sentences swapped, no rotation
        cfg = HAND_CONFIGS["moves"]
        draws = hand_draws(cfg, length, sentence_shuffle=order(1, 0, size=length),
                           rotate=np.array([1.0, 0.5], np.float32))
        expected = [R.BOS, 40, 50, 60, 10, 11, 20, 30, 12, R.FULL_STOP, R.EOS]
    expected = np.array(expected + [R.PAD] * (length - len(expected)))
    source, _ = _apply(jnp.asarray(tokens), jnp.asarray(WORDY), draws, cfg)
    np.testing.assert_array_equal(np.asarray(source)[0], expected)
    one_row = jax.tree.map(lambda a: np.asarray(a)[0], draws)
    np.testing.assert_array_equal(R.reference_batch(tokens, WORDY, cfg, lambda b: R.ForcedDraws(one_row))[0],
                                  expected)


def test_span_budget_rule_matches_fairseq_loop():
    rng = np.random.default_rng(1)
    drawn = rng.integers(0, 6, size=(200, 24)).astype(np.int32)
    drawn[:20, :5] = 0
    budget = rng.integers(0, 30, size=200).astype(np.int32)
    lengths, spans, inserts = jax.jit(ops.span_lengths)(drawn, budget)
    for b in range(200):
        if budget[b] == 0:
            assert spans[b] == inserts[b] == 0
            continue
        cum = np.cumsum(drawn[b])
        if cum[-1] < budget[b]:
            continue  # fairseq would draw more
        i = int(np.argmax(cum >= budget[b]))
        kept = drawn[b, :i + 1].copy()
        kept[i] = budget[b] - (cum[i - 1] if i else 0)
        positive = kept[kept > 0]
        assert spans[b] == len(positive) and inserts[b] == (kept == 0).sum()
        np.testing.assert_array_equal(np.asarray(lengths[b, :len(positive)]), positive)
        assert int(np.asarray(lengths[b]).sum()) == budget[b]


# ------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_specials_padding_and_length_bounds(name):
    cfg = CONFIGS[name]
    tokens, source, mask = noised(name)
    n_in = (tokens != cfg.pad_id).sum(axis=1)
    n_out = lengths(mask)
    S = source.shape[1]
    assert S == (cfg.source_length or L)
    pos = np.arange(S)[None, :]
    np.testing.assert_array_equal(mask, (pos < n_out[:, None]).astype(np.int32))
    assert (source[:, 0] == cfg.bos_id).all()
    assert (source[np.arange(B), n_out - 1] == cfg.eos_id).all()
    inside = pos < n_out[:, None]
    assert (source[~inside] == cfg.pad_id).all()  # padding only at the end
    interior = inside & (pos > 0) & (pos < n_out[:, None] - 1)
    assert not np.isin(source[interior], [cfg.pad_id, cfg.bos_id, cfg.eos_id]).any()
    assert (n_out >= 2).all() and (n_out <= S).all()
    poisson = cfg.mask_ratio > 0 and cfg.mask_length == "span-poisson"
    if cfg.insert_ratio == 0 and not poisson:
        if cfg.mask_ratio == 0 or cfg.replace_length == -1 or cfg.mask_length == "subword" and cfg.replace_length == 1:
            np.testing.assert_array_equal(n_out, n_in)  # nothing deleted or inserted
        else:
            assert (n_out <= n_in).all() and (n_out < n_in).any()


def test_random_replacements_are_never_special():
    # Outputs take their random tokens from these draws (exact agreement above).
    cfg = config("bart_large", insert_ratio=0.3)
    draws = _sample(noise_key(1, 0), jnp.arange(B), L, V, cfg)
    for field in ("mask_tokens", "zero_span_tokens", "insert_tokens"):
        drawn = np.asarray(getattr(draws, field))
        assert drawn.size > 1000
        assert not np.isin(drawn, SPECIALS).any() and drawn.min() >= 0 and drawn.max() < V


def is_concatenation(out, pieces) -> bool:
    """Whether `out` is the concatenation of all `pieces` in some order (backtracking)."""
    def search(at, left):
        if not left:
            return at == len(out)
        return any(tuple(out[at:at + len(p)]) == p and search(at + len(p), left[:i] + left[i + 1:])
                   for i, p in enumerate(left))
    return search(0, list(pieces))


def test_sentence_shuffling_permutes_whole_sentences():
    tokens, source, mask = noised("sentence_shuffling")
    changed = 0
    for b in range(B):
        n = (tokens[b] != R.PAD).sum()
        assert source[b, 0] == R.BOS and source[b, n - 1] == R.EOS
        assert is_concatenation(list(source[b, 1:n - 1]), sentences(tokens[b, :n]))
        changed += not np.array_equal(source[b], tokens[b])
    assert changed > B // 4


def test_full_stop_split_reproduces_fairseqs_sentences():
    """fairseq's BART recipe ends sentences only at the bare '.' token (GPT-2 id 13); the 'full_stop'
    split does that through the training noise, the default also at '!' and '?'."""
    from bart_jax.data.tokenizer import load_tokenizer
    from bart_jax.train import config as C
    from bart_jax.train.inputs import noise_batch_fns

    tok = load_tokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer_bpe"))
    full_stop = tok.encode(".", add_special_tokens=False)
    assert tok.sentence_end_ids("full_stop") == tuple(full_stop) and len(full_stop) == 1
    assert set(tok.encode("!?", add_special_tokens=False)) <= set(tok.sentence_end_ids())
    with pytest.raises(ValueError, match="sentence split"):
        tok.sentence_end_ids("comma")
    pieces = [tok.encode(t, add_special_tokens=False) for t in ("Aa bb! Cc dd.", " Ee ff.", " Gg hh.")]
    row = [tok.bos_id, *sum(pieces, []), tok.eos_id]
    tokens = jnp.asarray(np.tile(np.asarray(row, np.int32), (64, 1)))
    for split, splits_at_bang in (("full_stop", False), ("punctuation", True)):
        cfg = C.RunConfig(noise=C.NoiseSection(preset="sentence_shuffling", sentence_split=split))
        # A decoder start other than </s> (the model's decoder_start_token_id) reaches the decoder inputs.
        train_fn, _ = noise_batch_fns(cfg, tok, tok.bos_id)
        out_batch = train_fn({"tokens": tokens}, 0)
        assert tok.bos_id != tok.eos_id and np.all(np.asarray(out_batch["decoder_input_ids"])[:, 0] == tok.bos_id)
        source = np.asarray(out_batch["input_ids"])
        whole = [is_concatenation(list(out[1:-1]), [tuple(p) for p in pieces]) for out in source]
        assert sum(not np.array_equal(out, row) for out in source) > 16
        assert all(whole) != splits_at_bang


def test_rotation_is_a_cyclic_shift_of_the_interior():
    tokens, source, mask = noised("document_rotation")
    shifted = 0
    for b in range(B):
        n = (tokens[b] != R.PAD).sum()
        inner, out = list(tokens[b, 1:n - 1]), list(source[b, 1:n - 1])
        assert source[b, 0] == R.BOS and source[b, n - 1] == R.EOS
        assert any(out == inner[k:] + inner[:k] for k in range(max(len(inner), 1)))
        shifted += out != inner
    assert shifted > B // 2


def word_spans(row, word_starts):
    """[(start, end)] token ranges of the words of an unpadded row's interior."""
    n = len(row)
    starts = [j for j in range(1, n - 1) if word_starts[row[j]]]
    return [(s, (starts[i + 1] if i + 1 < len(starts) else n - 1)) for i, s in enumerate(starts)]


def test_deletion_removes_exactly_whole_chosen_words():
    cfg = config("token_deletion")
    tokens = rows(seed=5, distinct=True)
    ws = R.make_word_starts(256)
    source, mask = noise_tokens(noise_key(2, 0), jnp.asarray(tokens), jnp.asarray(ws), cfg)
    source, n_out = np.asarray(source), lengths(mask)
    for b in range(B):
        row = tokens[b][tokens[b] != R.PAD]
        out = source[b, :n_out[b]]
        kept = np.isin(row, out)
        np.testing.assert_array_equal(row[kept], out)  # order kept, nothing added
        spans = word_spans(row, ws)
        deleted_words = 0
        for s, e in spans:
            assert kept[s:e].all() or not kept[s:e].any()  # whole words only
            deleted_words += not kept[s]
        assert deleted_words == math.ceil(np.float32(len(spans)) * np.float32(0.3))
        first = spans[0][0] if spans else len(row) - 1
        assert kept[:first].all() and kept[-1]  # pieces before the first word start, and </s>


def test_token_masking_masks_every_token_of_the_chosen_words():
    cfg = config("token_masking")
    tokens = rows(seed=5, distinct=True)
    ws = R.make_word_starts(256)
    source, mask = noise_tokens(noise_key(2, 0), jnp.asarray(tokens), jnp.asarray(ws), cfg)
    source = np.asarray(source)
    np.testing.assert_array_equal(lengths(mask), (tokens != R.PAD).sum(axis=1))
    for b in range(B):
        n = (tokens[b] != R.PAD).sum()
        row, out = tokens[b, :n], source[b, :n]
        masked = out == R.MASK
        np.testing.assert_array_equal(out[~masked], row[~masked])
        spans = word_spans(row, ws)
        for s, e in spans:
            assert masked[s:e].all() or not masked[s:e].any()
        assert sum(masked[s] for s, _ in spans) == math.ceil(np.float32(len(spans)) * np.float32(0.3))


def test_encoder_length_policy_keeps_the_head_and_closes_with_eos():
    cfg = config("document_rotation", rotate_ratio=0.0, insert_ratio=0.5, random_ratio=0.0)
    tokens = rows()
    source, mask = noise_tokens(noise_key(0, 0), jnp.asarray(tokens), jnp.asarray(WORD_STARTS), cfg)
    source, n_out = np.asarray(source), lengths(mask)
    n_in = (tokens != R.PAD).sum(axis=1)
    full = n_in + np.ceil(n_in * 0.5).astype(int)
    long = full > L
    assert long.any() and (~long).any()
    assert (n_out[long] == L).all() and (source[long, L - 1] == R.EOS).all()
    np.testing.assert_array_equal(n_out[~long], full[~long])
    draws = _sample(noise_key(0, 0), jnp.arange(B), L, V, cfg)
    np.testing.assert_array_equal(source, forced_reference(tokens, cfg, draws))


# ------------------------------------------------------------------------ randomness and sharding


def test_deterministic_for_a_key_and_different_for_another():
    tokens, first, _ = noised("bart_large", 0)
    again, _ = noise_tokens(noise_key(0, 0), jnp.asarray(tokens), jnp.asarray(WORD_STARTS),
                            CONFIGS["bart_large"], row_ids=jnp.arange(B))
    np.testing.assert_array_equal(np.asarray(again), first)
    _, other, _ = noised("bart_large", 1)
    assert (first != other).any(axis=1).mean() > 0.9
    data = lambda seed, step: tuple(np.asarray(jax.random.key_data(noise_key(seed, step))))  # noqa: E731
    assert data(0, 1) == data(0, 1) and len({data(0, 1), data(0, 2), data(1, 1)}) == 3


def test_rows_depend_only_on_key_and_row_id():
    """A row's noise is a function of (seed, step, row id, its tokens): not of its place in the batch,
    the batch size or the other rows."""
    cfg = CONFIGS["everything"]
    tokens, full, _ = noised("everything")
    shuffled = np.random.default_rng(0).permutation(B)
    moved, _ = noise_tokens(noise_key(0, 0), jnp.asarray(tokens[shuffled]), jnp.asarray(WORD_STARTS), cfg,
                            row_ids=jnp.asarray(shuffled))
    np.testing.assert_array_equal(np.asarray(moved), full[shuffled])
    # rows 5 and 17 in a batch of 3 beside a row they never met
    small = np.stack([tokens[17], rows(seed=9)[0], tokens[5]])
    alone, _ = noise_tokens(noise_key(0, 0), jnp.asarray(small), jnp.asarray(WORD_STARTS), cfg,
                            row_ids=jnp.asarray([17, 1000, 5]))
    np.testing.assert_array_equal(np.asarray(alone)[[0, 2]], full[[17, 5]])
    # the same tokens under another row id, step or seed are noised differently
    for key, ids in ((noise_key(0, 0), np.arange(B) + B), (noise_key(0, 1), np.arange(B)),
                     (noise_key(1, 0), np.arange(B))):
        other, _ = noise_tokens(key, jnp.asarray(tokens), jnp.asarray(WORD_STARTS), cfg, row_ids=jnp.asarray(ids))
        assert (np.asarray(other) != full).any(axis=1).mean() > 0.9
    # default row ids are the positions in the batch (checked on a config that compiles quickly)
    tokens, full, _ = noised("document_rotation")
    default, _ = noise_tokens(noise_key(0, 0), jnp.asarray(tokens), jnp.asarray(WORD_STARTS),
                              CONFIGS["document_rotation"])
    np.testing.assert_array_equal(np.asarray(default), full)


def test_same_result_when_the_batch_is_sharded_over_devices():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    name = "deletion_random_insert"  # sorts, scatters, loops and random tokens, quick to compile
    tokens, expected, _ = noised(name)
    sharded = jax.device_put(jnp.asarray(tokens), sharding)
    source, _ = noise_tokens(noise_key(0, 0), sharded, jnp.asarray(WORD_STARTS), CONFIGS[name])
    np.testing.assert_array_equal(np.asarray(source), expected)


def test_raw_uint32_keys_work_like_typed_keys():
    typed = noise_key(4, 2)
    raw = jax.random.key_data(typed)
    a = jax.random.key_data(row_keys(typed, jnp.arange(3)))
    b = jax.random.key_data(row_keys(raw, jnp.arange(3)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len({tuple(r) for r in np.asarray(jax.random.key_data(row_keys(typed, jnp.arange(1000))))}) == 1000
    tokens, expected, _ = noised("document_rotation")
    raw = jax.random.key_data(noise_key(0, 0))  # the key `noised` uses
    source, _ = noise_tokens(raw, jnp.asarray(tokens), jnp.asarray(WORD_STARTS), CONFIGS["document_rotation"])
    np.testing.assert_array_equal(np.asarray(source), expected)


# ---------------------------------------------------------------------------------- batch contract


def test_denoising_batch_contract():
    name = "document_rotation"  # the contract does not depend on the noise
    tokens, source, mask = noised(name)
    batch = denoising_batch(noise_key(0, 0), jnp.asarray(tokens), jnp.asarray(WORD_STARTS), CONFIGS[name])
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
    for value in batch.values():
        assert value.dtype == jnp.int32
    chex.assert_shape([batch["input_ids"], batch["attention_mask"]], (B, L))
    chex.assert_shape([batch["decoder_input_ids"], batch["decoder_attention_mask"], batch["labels"]], (B, L))
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), source)
    np.testing.assert_array_equal(np.asarray(batch["attention_mask"]), mask)
    np.testing.assert_array_equal(np.asarray(batch["labels"]), tokens)
    decoder_in = np.concatenate([np.full((B, 1), 2), tokens[:, :-1]], axis=1)  # </s> starts the decoder
    np.testing.assert_array_equal(np.asarray(batch["decoder_input_ids"]), decoder_in)
    # the mask marks the decoder inputs that are not pad (the fine-tuning loader's convention)
    np.testing.assert_array_equal(np.asarray(batch["decoder_attention_mask"]), (decoder_in != R.PAD).astype(np.int32))


def test_decoder_inputs_follow_the_fine_tuning_loaders_convention():
    """Pretraining (noise) and fine-tuning (loader) batches build the decoder half the same way from the
    same targets."""
    from bart_jax.data.loader import _BucketWindow

    tokens = rows()
    window = _BucketWindow(batch_size=B, source_boundaries=(4,), target_boundaries=(L,), pad_id=R.PAD,
                           bos_id=R.BOS, eos_id=R.EOS, decoder_start_id=R.EOS, seed=0, shuffle=False,
                           return_example_ids=False)
    examples = [{"id": i, "source": [R.BOS, R.EOS], "target": [int(t) for t in row if t != R.PAD]}
                for i, row in enumerate(tokens)]
    finetune = window._batch(examples)
    np.testing.assert_array_equal(finetune["labels"], tokens)
    pretrain = denoising_batch(noise_key(0, 0), jnp.asarray(tokens), jnp.asarray(WORD_STARTS),
                               CONFIGS["document_rotation"])
    for key in ("decoder_input_ids", "decoder_attention_mask"):
        assert finetune[key].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(pretrain[key]), finetune[key])


def test_bad_inputs_raise_value_errors():
    cfg = CONFIGS["bart_large"]
    ws = jnp.asarray(WORD_STARTS)
    with pytest.raises(ValueError, match="tokens"):
        noise_tokens(noise_key(0, 0), jnp.zeros((4,), jnp.int32), ws, cfg)
    with pytest.raises(ValueError, match="tokens"):
        noise_tokens(noise_key(0, 0), jnp.zeros((2, 8), jnp.float32), ws, cfg)
    with pytest.raises(ValueError, match="word_starts"):
        noise_tokens(noise_key(0, 0), jnp.zeros((2, 8), jnp.int32), ws.astype(jnp.int32), cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        noise_tokens(noise_key(0, 0), jnp.zeros((2, 8), jnp.int32), ws[:4], cfg)
    with pytest.raises(ValueError, match="length"):
        noise_sizes(1, cfg)


# ---------------------------------------------------------------------------------- primitives


def test_random_order_takes_valid_slots_by_priority():
    rng = np.random.default_rng(0)
    priority = rng.integers(0, 2**32, size=(64, 200), dtype=np.uint64).astype(np.uint32)
    priority[:, 50:60] = 7  # ties go to the lower slot
    valid = rng.random((64, 200)) < 0.6
    order = np.asarray(jax.jit(P.random_order)(jnp.asarray(priority), jnp.asarray(valid)))
    for b in range(64):
        slots = np.flatnonzero(valid[b])
        expected = np.concatenate([slots[np.argsort(priority[b, slots], kind="stable")], np.flatnonzero(~valid[b])])
        np.testing.assert_array_equal(order[b], expected)


def test_scatter_helpers_drop_out_of_range_indices():
    idx = jnp.asarray([[0, 3, -1, 5, 2]])
    np.testing.assert_array_equal(np.asarray(P.put(4, idx, jnp.asarray([[1, 2, 3, 4, 5]]), 9)), [[1, 9, 5, 2]])
    np.testing.assert_array_equal(np.asarray(P.put_add(4, jnp.asarray([[1, 1, -2, 4]]), 1)), [[0, 2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(P.take(jnp.asarray([[5, 6, 7]]), jnp.asarray([[-1, 1, 9]]))),
                                  [[5, 6, 7]])
