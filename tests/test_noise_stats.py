"""Statistics of bart_jax.noise over many rows against the configured values and against the numpy
transcription of fairseq run on its own numpy RNG. Seeds are fixed; every test fails only below
p = 1e-4 (or beyond 4.5 standard errors), so a correct kernel passes with a wide margin."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import noise_reference as R
from bart_jax.noise import noise_key, noise_preset, noise_tokens, sample_draws, span_length_pmf
from bart_jax.noise import primitives as P

P_MIN = 1e-4
V, B, L = 200, 2048, 64
WORD_STARTS = R.make_word_starts(V)
ENDS = (R.FULL_STOP, R.BANG)
_sample = jax.jit(sample_draws, static_argnums=(2, 3, 4))


def config(name: str, **overrides):
    return noise_preset(name, sentence_end_ids=ENDS, mask_id=R.MASK, **overrides)


def run_kernel(tokens, cfg, seed=0, word_starts=WORD_STARTS):
    source, mask = noise_tokens(noise_key(seed, 0), jnp.asarray(tokens), jnp.asarray(word_starts), cfg)
    return np.asarray(source), np.asarray(mask).sum(axis=1)


def run_reference(tokens, cfg, seed=0, word_starts=WORD_STARTS):
    draws = R.NumpyDraws(np.random.default_rng(seed), cfg, len(word_starts))
    source = R.reference_batch(tokens, word_starts, cfg, lambda b: draws)
    return source, (source != cfg.pad_id).sum(axis=1)


@functools.lru_cache(maxsize=None)
def rows(seed=0, batch=B, length=L):
    return R.make_rows(np.random.default_rng(seed), batch, length, V, min_len=length // 2)


def chi2_same(a, b, min_expected=5.0) -> float:
    """p-value that two samples of small non-negative integers share a distribution (2 x k table,
    sparse tail bins pooled)."""
    a, b = np.asarray(a, int), np.asarray(b, int)
    k = max(a.max(), b.max()) + 1
    table = np.stack([np.bincount(a, minlength=k), np.bincount(b, minlength=k)]).astype(float)
    table = _pool(table, min_expected)
    if table.shape[1] < 2:
        return 1.0
    return stats.chi2_contingency(table)[1]


def _pool(table, min_expected):
    """Merge adjacent columns until every expected count is at least min_expected."""
    cols, current = [], np.zeros(table.shape[0])
    total = table.sum()
    for col in table.T:
        current = current + col
        expected = current.sum() * table.sum(axis=1) / total
        if expected.min() >= min_expected:
            cols.append(current)
            current = np.zeros(table.shape[0])
    if current.sum() > 0:
        if cols:
            cols[-1] = cols[-1] + current
        else:
            cols.append(current)
    return np.stack(cols, axis=1)


def chi2_fit(counts, probs, min_expected=5.0) -> float:
    """p-value of observed counts against probabilities (sparse tail bins pooled); categories of
    probability 0 must be empty."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float) / np.sum(probs)
    assert counts[probs == 0].sum() == 0
    counts, probs = counts[probs > 0], probs[probs > 0]
    expected = probs * counts.sum()
    obs, exp, o, e = [], [], 0.0, 0.0
    for c, x in zip(counts, expected):
        o, e = o + c, e + x
        if e >= min_expected:
            obs.append(o), exp.append(e)
            o, e = 0.0, 0.0
    if e > 0:
        obs[-1] += o
        exp[-1] += e
    return stats.chisquare(obs, exp).pvalue


# ------------------------------------------------------------------------------- span lengths


def test_span_lengths_follow_fairseqs_truncated_poisson():
    cfg = config("bart_large")
    draws = _sample(noise_key(0, 0), jnp.arange(4096), L, V, cfg)
    lengths = np.asarray(draws.span_lengths).ravel()
    pmf = span_length_pmf(3.5)
    assert lengths.max() < len(pmf)
    assert chi2_fit(np.bincount(lengths, minlength=len(pmf)), pmf) > P_MIN
    assert abs(lengths.mean() - 3.5) < 4.5 * math.sqrt(3.5 / lengths.size)


def mask_runs(source, n):
    """Lengths of runs of <mask> in each row's interior."""
    runs = []
    for row, m in zip(source, n):
        run = 0
        for tok in row[1:m - 1]:
            if tok == R.MASK:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        if run:
            runs.append(run)
    return np.asarray(runs)


def test_span_masking_matches_fairseq_in_distribution():
    """One <mask> per token (replace_length -1) makes coverage visible: the covered fraction of word
    starts and the lengths of masked runs (overlapping spans merge) match the reference."""
    cfg = config("token_masking", mask_length="span-poisson", poisson_lambda=3.5)
    tokens = rows()
    ours, n_ours = run_kernel(tokens, cfg)
    theirs, n_theirs = run_reference(tokens, cfg)
    assert chi2_same(mask_runs(ours, n_ours), mask_runs(theirs, n_theirs)) > P_MIN

    def covered_starts(source):
        return ((source == R.MASK) & WORD_STARTS[tokens]).sum(axis=1)

    assert chi2_same(covered_starts(ours), covered_starts(theirs)) > P_MIN
    starts = WORD_STARTS[tokens].sum()
    fraction = covered_starts(ours).sum() / starts
    budget = sum(math.ceil(np.float32(s) * np.float32(0.3)) for s in WORD_STARTS[tokens].sum(axis=1))
    # Overlaps make coverage a little smaller than the budget, never larger.
    assert 0.8 * budget / starts < fraction <= budget / starts
    n_in = (tokens != R.PAD).sum(axis=1)
    assert chi2_same(n_ours - n_in, n_theirs - n_in) > P_MIN  # inserts from zero-length spans


def test_bart_large_noise_matches_fairseq_in_distribution():
    cfg = config("bart_large")
    tokens = rows()
    ours, n_ours = run_kernel(tokens, cfg)
    theirs, n_theirs = run_reference(tokens, cfg)
    n_in = (tokens != R.PAD).sum(axis=1)
    assert chi2_same(n_ours - n_in + 64, n_theirs - n_in + 64) > P_MIN  # length change
    masks = lambda s: (s == R.MASK).sum(axis=1)  # noqa: E731
    assert chi2_same(masks(ours), masks(theirs)) > P_MIN
    first = lambda s: np.where(s[:, 1] == R.MASK, 0, 1)  # noqa: E731  (rotation, masking at the start)
    assert chi2_same(first(ours), first(theirs)) > P_MIN
    kept = lambda s, t: np.array([np.isin(a, b).sum() for a, b in zip(s, t)])  # noqa: E731
    assert chi2_same(kept(ours, tokens), kept(theirs, tokens)) > P_MIN


# ------------------------------------------------------------------------------- random tokens


def test_random_replacement_fraction_of_masked_words():
    """Word spans never overlap, so each row masks exactly its budget of words, each wholly <mask>
    or wholly random: the random share is 1 - (words with <mask>) / budget."""
    cfg = config("token_masking", random_ratio=0.25)
    tokens = rows()
    ours, _ = run_kernel(tokens, cfg)
    masked_words = random_words = 0
    for row, out in zip(tokens, ours):
        n = (row != R.PAD).sum()
        starts = np.flatnonzero(WORD_STARTS[row[:n]])
        budget = math.ceil(np.float32(len(starts)) * np.float32(0.3))
        with_mask = (out[starts] == R.MASK).sum()
        masked_words += budget
        random_words += budget - with_mask
    share = random_words / masked_words
    assert abs(share - 0.25) < 4.5 * math.sqrt(0.25 * 0.75 / masked_words)


def test_random_tokens_are_uniform_over_the_allowed_ids():
    cfg = config("bart_large", vocab_size=40)
    draws = _sample(noise_key(0, 0), jnp.arange(512), L, cfg.vocab_size, cfg)
    drawn = np.asarray(draws.mask_tokens).ravel()
    allowed = [i for i in range(40) if i not in (R.BOS, R.PAD, R.EOS, R.MASK)]
    counts = np.bincount(drawn, minlength=40)
    assert counts[[R.BOS, R.PAD, R.EOS, R.MASK]].sum() == 0 and len(counts) == 40
    assert chi2_fit(counts[allowed], np.ones(len(allowed))) > P_MIN
    flags = np.asarray(draws.span_random).ravel() < cfg.random_ratio
    assert abs(flags.mean() - 0.1) < 4.5 * math.sqrt(0.09 / flags.size)


# --------------------------------------------------------------------------- moves and inserts


def distinct_rows(batch, n, seed=0):
    rng = np.random.default_rng(seed)
    out = np.empty((batch, n), np.int32)
    out[:, 0], out[:, -1] = R.BOS, R.EOS
    for b in range(batch):
        out[b, 1:-1] = rng.permutation(np.arange(R.FIRST_WORD_ID, V))[:n - 2]
    return out


def test_rotation_probability_and_uniform_offsets():
    n, batch = 20, 4000
    cfg = config("document_rotation", rotate_ratio=0.5)
    tokens = distinct_rows(batch, n)
    ours, _ = run_kernel(tokens, cfg, word_starts=WORD_STARTS)
    m = n - 2
    shifts = np.array([int(np.flatnonzero(t[1:-1] == o[1])[0]) for t, o in zip(tokens, ours)])
    for t, o, s in zip(tokens[:50], ours[:50], shifts[:50]):
        np.testing.assert_array_equal(np.roll(t[1:-1], -s), o[1:-1])
    # offset uniform in [1, n-1]: offsets 1 and n-1 leave the row as it was
    probs = np.full(m, 0.5 / (n - 1))
    probs[0] += 0.5 + 0.5 / (n - 1)
    assert chi2_fit(np.bincount(shifts, minlength=m), probs) > P_MIN


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sentence_permutation_distribution(ratio):
    batch = 4800
    tokens = np.tile(np.array([R.BOS, 10, R.FULL_STOP, 20, R.FULL_STOP, 30, R.FULL_STOP, 40, R.EOS], np.int32),
                     (batch, 1))
    cfg = config("sentence_shuffling", permute_sentence_ratio=ratio)
    ours, _ = run_kernel(tokens, cfg)
    perms = list(itertools.permutations(range(4)))
    firsts = {10: 0, 20: 1, 30: 2, 40: 3}
    seen = [tuple(firsts[t] for t in row if t in firsts) for row in ours]
    counts = np.array([seen.count(p) for p in perms])
    assert counts.sum() == batch
    if ratio == 1.0:
        probs = np.ones(24)
    else:  # two of four sentences chosen, then shuffled: identity half the time, else one swap
        moved = np.array([sum(a != b for a, b in zip(p, range(4))) for p in perms])
        probs = np.where(moved == 0, 6.0, np.where(moved == 2, 1.0, 0.0))  # 1/2 and 1/12 per swap
    assert chi2_fit(counts, probs) > P_MIN


def test_insertion_positions_are_uniform():
    n, batch = 20, 4000
    cfg = config("document_rotation", rotate_ratio=0.0, insert_ratio=0.1, random_ratio=0.0, source_length=n + 2)
    tokens = distinct_rows(batch, n)
    ours, lengths = run_kernel(tokens, cfg)
    assert (lengths == n + 2).all()  # ceil(20 x 0.1) = 2 inserts
    positions = np.concatenate([np.flatnonzero(row == R.MASK) for row in ours])
    assert len(positions) == 2 * batch and positions.min() >= 1 and positions.max() <= n
    assert chi2_fit(np.bincount(positions - 1, minlength=n), np.ones(n)) > P_MIN


def test_random_orders_from_jax_random_bits_are_uniform():
    """The first k slots of a random order (insert positions: randperm(n)[:k]) are a uniform k-subset,
    and a whole order is a uniform permutation, as fairseq's randperm."""
    batch = 24000
    keys = jax.random.split(jax.random.key(0), batch)
    bits = jax.vmap(lambda k: jax.random.bits(k, (8,), jnp.uint32))(keys)
    order = jax.jit(P.random_order)
    picks = np.sort(np.asarray(order(bits, P.prefix(jnp.full(batch, 6), 8)))[:, :3], axis=1)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(6), 3))}
    counts = np.bincount([subsets[tuple(p)] for p in picks], minlength=20)
    assert chi2_fit(counts, np.ones(20)) > P_MIN
    whole = np.asarray(order(bits, P.prefix(jnp.full(batch, 4), 8)))[:, :4]
    perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([perms[tuple(o)] for o in whole], minlength=24)
    assert chi2_fit(counts, np.ones(24)) > P_MIN
