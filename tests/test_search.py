"""Model-independent search (bart_jax.decode.search) on toy Markov / table models: no network at all."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.decode.search import (
    SearchControls,
    beam_search,
    gather_beams,
    greedy_search,
    banned_ngram_tokens,
    process_scores,
    search,
)

EOS, PAD, START = 2, 1, 2


def controls(**kw):
    base = dict(max_length=6, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START)
    return SearchControls.create(**{**base, **kw})


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def table_step(tables, rows_per_input):
    """A Markov model per input: logits = tables[input, previous token]. tables: [B, V, V]."""
    def step(tokens, index, state):
        inputs = jnp.arange(tokens.shape[0]) // rows_per_input
        return state["tables"][inputs, tokens], state
    return step, {"tables": jnp.asarray(tables, jnp.float32)}


def probs_table(vocab, rows):
    """[V, V] logits = log of the given next-token distributions {prev: {token: p}}, uniform elsewhere."""
    table = np.full((vocab, vocab), np.log(1.0 / vocab))
    for prev, dist in rows.items():
        p = np.full(vocab, (1.0 - sum(dist.values())) / (vocab - len(dist)))
        for tok, q in dist.items():
            p[tok] = q
        table[prev] = np.log(p)
    return table


# ----------------------------------------------------------------------------- processors
@pytest.mark.parametrize("n, capacity", [(1, 4), (2, 4), (3, 4), (4, 4), (5, 5)])
def test_no_repeat_ngram_mask_matches_brute_force(n, capacity):
    rng = np.random.default_rng(n)
    vocab, length = 5, 10
    sequences = rng.integers(0, 3 if n < 4 else 2, size=(6, length))  # few distinct tokens -> many repeats
    banned_fn = jax.jit(banned_ngram_tokens, static_argnums=(3, 4))
    for index in range(length):
        banned = np.asarray(banned_fn(jnp.asarray(sequences), jnp.int32(index), jnp.int32(n), capacity, vocab))
        got = np.zeros((sequences.shape[0], vocab + 1), bool)
        np.put_along_axis(got, banned, True, axis=1)
        got = got[:, :vocab]
        for row in range(sequences.shape[0]):
            prefix = list(sequences[row, :index + 1])
            want = np.zeros(vocab, bool)
            if len(prefix) + 1 >= n:
                tail = tuple(prefix[len(prefix) - n + 1:]) if n > 1 else ()
                for j in range(len(prefix) - n + 1):
                    if tuple(prefix[j:j + n - 1]) == tail:
                        want[prefix[j + n - 1]] = True
            np.testing.assert_array_equal(got[row], want, err_msg=f"row {row} index {index} prefix {prefix}")


def test_process_scores_min_length_and_forced_tokens():
    c = controls(max_length=6, min_length=3, forced_bos_token_id=0, forced_eos_token_id=EOS)
    scores = jnp.zeros((2, 7))
    seqs = jnp.full((2, 6), 5)

    def at(index):
        return np.asarray(process_scores(scores, seqs, jnp.int32(index), c))

    first = at(0)  # current length 1: forced BOS wins over everything
    assert (first[:, 0] == 0).all() and np.isneginf(np.delete(first, 0, axis=1)).all()
    second = at(1)  # length 2 < min_length 3: EOS banned, the rest untouched
    assert np.isneginf(second[:, EOS]).all() and (np.delete(second, EOS, axis=1) == 0).all()
    assert (at(2) == 0).all()  # length 3: nothing applies
    last = at(4)  # length 5 = max_length - 1: forced EOS
    assert (last[:, EOS] == 0).all() and np.isneginf(np.delete(last, EOS, axis=1)).all()


def test_gather_beams_leaves_shared_leaves_alone():
    state = {"per_beam": jnp.arange(12).reshape(2, 6), "shared": jnp.arange(3)}
    rows = jnp.array([5, 5, 0, 1, 2, 3])
    out = gather_beams(state, rows, {"per_beam": 1, "shared": None})
    np.testing.assert_array_equal(out["per_beam"], np.arange(12).reshape(2, 6)[:, [5, 5, 0, 1, 2, 3]])
    np.testing.assert_array_equal(out["shared"], np.arange(3))


# ----------------------------------------------------------------------------- greedy / sampling
def test_greedy_matches_argmax_loop_and_pads_after_eos():
    rng = np.random.default_rng(0)
    vocab, length = 6, 8
    tables = rng.normal(size=(3, vocab, vocab)) * 3
    tables[0, :, EOS] = 10.0  # input 0 stops at once, the others run on
    step, state = table_step(tables, 1)
    c = controls(max_length=length)
    seqs, scores = jax.jit(lambda s: greedy_search(step, s, 3, c))(state)
    for b in range(3):
        want, total, done = [START], 0.0, False
        while len(want) < length:
            if done:
                want.append(PAD)
                continue
            lp = log_softmax(tables[b, want[-1]])
            want.append(int(lp.argmax()))
            total += lp.max()
            done = want[-1] == EOS
        assert list(np.asarray(seqs[b])) == want
        np.testing.assert_allclose(scores[b], total, rtol=1e-5, atol=1e-5)
    assert list(np.asarray(seqs[0, :3])) == [START, EOS, PAD]


def test_sampling_controls():
    rng = np.random.default_rng(1)
    vocab = 12
    tables = rng.normal(size=(1, vocab, vocab))
    tables[0, :, EOS] = -20.0
    step, state = table_step(tables, 4)
    greedy, _ = greedy_search(step, state, 4, controls(max_length=10))

    def sample(key, **kw):
        c = controls(max_length=10, do_sample=True, num_return_sequences=4, **kw)
        return np.asarray(search(step, state, 1, c, rng=key)[0])[0]

    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(sample(key, top_k=1), np.asarray(greedy))  # top_k 1 = greedy
    np.testing.assert_array_equal(sample(key, top_p=1e-6), np.asarray(greedy))  # tiny nucleus = greedy
    np.testing.assert_array_equal(sample(key, temperature=1e-3), np.asarray(greedy))
    hot = sample(key, temperature=5.0)
    assert len({tuple(r) for r in hot}) > 1  # the 4 samples of one input differ
    np.testing.assert_array_equal(hot, sample(key, temperature=5.0))  # same key, same samples
    assert not np.array_equal(hot, sample(jax.random.PRNGKey(4), temperature=5.0))
    top2 = sample(key, top_k=2, temperature=5.0)
    for row in top2:
        for prev, tok in zip(row[:-1], row[1:]):
            assert tok in np.argsort(tables[0, prev])[-2:]


# ----------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("kw", [
    dict(length_penalty=1.5),
    dict(length_penalty=0.0, min_length=3),
    dict(length_penalty=1.0, no_repeat_ngram_size=2),
])
def test_exhaustive_beam_search_equals_brute_force(kw):
    """With more beams than hypotheses and early_stopping='never' (exact for length_penalty >= 0), beam search
    must return every complete hypothesis ranked by sum log p / generated_length ** length_penalty."""
    vocab, length, batch, beams = 3, 5, 2, 32  # 31 complete hypotheses per input
    rng = np.random.default_rng(7)
    a = rng.normal(size=(length, vocab, vocab)) * 2
    b = rng.normal(size=(vocab + 1, vocab))
    bias = rng.normal(size=(batch, vocab))

    def step(tokens, index, state):  # depends on the previous two tokens: the state must follow its beam
        logits = jnp.asarray(a)[index, tokens] + jnp.asarray(b)[state["prev"]] + jnp.repeat(state["bias"], beams, 0)
        return logits, {"prev": tokens, "bias": state["bias"]}

    state = {"prev": jnp.full((batch * beams,), vocab, jnp.int32), "bias": jnp.asarray(bias, jnp.float32)}
    c = controls(max_length=length, num_beams=beams, early_stopping="never", **kw)
    seqs, scores = jax.jit(lambda s, c: beam_search(step, s, batch, c, {"prev": 0, "bias": None}))(state, c)

    lp, min_len, n = kw["length_penalty"], kw.get("min_length", 0), kw.get("no_repeat_ngram_size", 0)
    for item in range(batch):
        found = []

        def extend(prefix, total):
            prev = prefix[-2] if len(prefix) >= 2 else vocab
            logp = log_softmax(a[len(prefix) - 1, prefix[-1]] + b[prev] + bias[item])
            for tok in range(vocab):
                seq = prefix + [tok]
                if tok == EOS and len(prefix) < min_len:
                    continue
                if n and any(tuple(seq[j:j + n]) == tuple(seq[-n:]) for j in range(len(seq) - n)):
                    continue
                if tok == EOS or len(seq) == length:
                    found.append(((total + logp[tok]) / (len(seq) - 1) ** lp, seq))
                else:
                    extend(seq, total + logp[tok])

        extend([START], 0.0)
        found.sort(key=lambda x: -x[0])
        np.testing.assert_allclose(scores[item, :len(found)], [s for s, _ in found], rtol=1e-5)
        assert (np.asarray(scores[item, len(found):]) < -1e8).all()
        for rank, (_, seq) in enumerate(found):
            got = list(np.asarray(seqs[item, rank]))
            assert got == seq + [PAD] * (length - len(seq)), (rank, got, seq)


def test_eos_outside_top_num_beams_does_not_finish():
    """HF: of the 2K candidates only EOS ranked within the top K may finish; here `<start> EOS` ranks 3rd
    with K=2, so it must not be returned although its score (log 0.15) beats everything else."""
    vocab = 8
    table = probs_table(vocab, {START: {0: 0.5, 3: 0.3, EOS: 0.15}})
    step, state = table_step(table[None], 2)
    c = controls(max_length=3, num_beams=2, length_penalty=0.0)
    seqs, scores = beam_search(step, state, 1, c, {"tables": None})
    assert list(np.asarray(seqs[0, 0, :2])) == [START, 0]
    np.testing.assert_allclose(scores[0, 0], np.log(0.5) + np.log(1 / vocab), rtol=1e-5)
    assert scores[0, 0] < np.log(0.15)


def test_early_stopping_true_stops_at_num_beams_finished():
    """Two hypotheses finish by step 2; early_stopping=True returns the best of them, while False (HF's
    heuristic) and "never" keep going because lp=2 lets longer hypotheses score higher."""
    vocab = 4
    table = probs_table(vocab, {START: {EOS: 0.6, 0: 0.35, 3: 0.04},
                                0: {0: 0.6, EOS: 0.35, 3: 0.04},
                                3: {EOS: 0.9, 0: 0.05, 3: 0.04}})
    step, state = table_step(table[None], 2)
    results = {}
    for early in (True, False, "never"):
        c = controls(max_length=8, num_beams=2, length_penalty=2.0, early_stopping=early)
        seqs, scores = beam_search(step, state, 1, c, {"tables": None})
        results[early] = (list(np.asarray(seqs[0, 0])), float(scores[0, 0]))
    assert results[True][0][:3] == [START, EOS, PAD]
    np.testing.assert_allclose(results[True][1], np.log(0.6), rtol=1e-5)
    for early in (False, "never"):
        seq, score = results[early]
        assert seq[1] == 0 and score > results[True][1]


@pytest.mark.parametrize("seed, early_stopping, length_penalty", [(0, True, 1.0), (1, False, 3.0)])
def test_batch_items_are_independent(seed, early_stopping, length_penalty):
    """Each input finishes on its own: a batch gives what each input gives alone. Input 1 rarely ends, so
    the loop runs on after input 0 is done; input 0 must then take no new hypotheses (early_stopping=True:
    its K slots are full; False: HF's heuristic closed it for good). Seeds found to expose both."""
    rng = np.random.default_rng(seed)
    vocab, beams = 5, 2
    tables = rng.normal(size=(2, vocab, vocab)) * 1.5
    tables[0, :, EOS] += rng.normal() * 2
    tables[1, :, EOS] -= 3
    c = controls(max_length=10, num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping)
    step, state = table_step(tables, beams)
    seqs, scores = beam_search(step, state, 2, c, {"tables": None})
    for b in range(2):
        step1, state1 = table_step(tables[b:b + 1], beams)
        s1, sc1 = beam_search(step1, state1, 1, c, {"tables": None})
        np.testing.assert_array_equal(seqs[b], s1[0])
        np.testing.assert_allclose(scores[b], sc1[0], rtol=1e-6)


def test_search_shapes_and_return_sequences():
    rng = np.random.default_rng(2)
    tables = rng.normal(size=(2, 9, 9))
    step, state = table_step(tables, 4)
    seqs, scores = search(step, state, 2, controls(max_length=7, num_beams=4, num_return_sequences=3),
                          {"tables": None})
    chex.assert_shape(seqs, (2, 3, 7))
    chex.assert_shape(scores, (2, 3))
    assert seqs.dtype == jnp.int32 and scores.dtype == jnp.float32
    assert (np.diff(np.asarray(scores), axis=1) <= 0).all()  # best first
    assert (np.asarray(seqs[:, :, 0]) == START).all()


def test_traced_controls_share_one_program():
    """One compiled search serves every length_penalty, min_length, early_stopping, forced token and
    n-gram size up to its capacity."""
    tables = np.random.default_rng(3).normal(size=(1, 6, 6))
    step, state = table_step(tables, 2)
    run = jax.jit(lambda s, c: beam_search(step, s, 1, c, {"tables": None}))
    outputs = set()
    for lp, min_len, early, forced, n in itertools.product((0.5, 2.0), (0, 3), (True, "never"), (None, 0), (1, 3)):
        c = controls(num_beams=2, length_penalty=lp, min_length=min_len, early_stopping=early,
                     forced_bos_token_id=forced, no_repeat_ngram_size=n)
        assert c.ngram_capacity == 4
        outputs.add(np.asarray(run(state, c)[0]).tobytes())
    assert run._cache_size() == 1
    assert len(outputs) > 4  # the traced values do change the result


@pytest.mark.parametrize("bad, match", [
    (dict(num_beams=0), "num_beams"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, do_sample=True), "do_sample"),
    (dict(max_length=1), "max_length"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(forced_bos_token_id=99), "forced_bos_token_id"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
])
def test_invalid_controls_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        controls(vocab_size=10, **bad)
