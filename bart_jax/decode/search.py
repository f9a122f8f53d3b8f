"""Model-independent decoding: greedy, sampling and beam search over a step function, all on device.

A *step function* is the only thing the searches know about a model:

    step_fn(token_ids int32 [N], index int32 scalar, state) -> (logits float [N, V], state)

`token_ids` holds the token at decoder position `index` for every row (`index` 0 is the decoder start
token); the logits are for position `index + 1`. `state` is any pytree (e.g. a key/value cache). For beam
search the rows are ordered `b * num_beams + k`, and `beam_axes` says which state leaves follow a beam when
beams are reordered (an int axis) and which are shared by all beams of an input (None), e.g. cross-attention
keys/values.

Semantics follow Hugging Face transformers' PyTorch `generate` (v4.57) exactly (the controls and logits
processors: bart_jax.decode.controls):
  * beam search keeps the top `max(2, 1 + number of EOS ids) * num_beams` candidates; only EOS candidates
    ranked within the top `num_beams` may finish; each batch item finishes on its own; beams reaching
    `max_length` finish; a finished hypothesis scores `sum log p / generated_length ** length_penalty`
    (generated length counts EOS, not the start token); `early_stopping` True / False / "never" as in HF.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# SearchControls and the processors stay importable from here too (their home before bart_jax.decode.controls).
from bart_jax.decode.controls import (EARLY_STOPPING_CODES, SearchControls, banned_ngram_tokens,  # noqa: F401
                                      is_eos, process_scores, warp_for_sampling)

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# HF's masking constant: added to scores that must never be selected (kept identical so ties behave alike).
MASK_SCORE = -1.0e9


# ----------------------------------------------------------------------------- greedy / sampling
def greedy_search(step_fn: StepFn, state: Any, num_rows: int, controls: SearchControls,
                  rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding (or ancestral sampling when `controls.do_sample`) inside one `lax.while_loop`.

    num_rows: N, the step function's row count (batch * num_return_sequences for sampling); rng: a PRNG key,
    required when sampling. Returns sequences int32 [N, max_length] (start token first, pad after EOS and
    after the last step) and scores float32 [N]: the summed log-probabilities of the generated tokens
    (EOS included) under the processed distribution `log_softmax(process_scores(logits))`.
    """
    if controls.do_sample and rng is None:
        raise ValueError("do_sample=True needs an rng key")
    length = controls.max_length
    sequences = jnp.full((num_rows, length), controls.pad_token_id, jnp.int32)
    sequences = sequences.at[:, 0].set(controls.decoder_start_token_id)
    carry = dict(index=jnp.int32(0), sequences=sequences, finished=jnp.zeros((num_rows,), bool),
                 scores=jnp.zeros((num_rows,), jnp.float32), state=state)

    def cond(c):
        return (c["index"] < length - 1) & ~jnp.all(c["finished"])

    def body(c):
        index = c["index"]
        tokens = jax.lax.dynamic_index_in_dim(c["sequences"], index, axis=1, keepdims=False)
        logits, state = step_fn(tokens, index, c["state"])
        logits = process_scores(logits.astype(jnp.float32), c["sequences"], index, controls)
        if controls.do_sample:
            key = jax.random.fold_in(rng, index)
            next_tokens = jax.random.categorical(key, warp_for_sampling(logits, controls), axis=-1)
        else:
            next_tokens = jnp.argmax(logits, axis=-1)
        next_tokens = next_tokens.astype(jnp.int32)
        token_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), next_tokens[:, None], axis=-1)[:, 0]
        scores = c["scores"] + jnp.where(c["finished"], 0.0, token_logp)
        next_tokens = jnp.where(c["finished"], controls.pad_token_id, next_tokens)
        sequences = jax.lax.dynamic_update_index_in_dim(c["sequences"], next_tokens, index + 1, axis=1)
        finished = c["finished"] | is_eos(next_tokens, controls)
        return dict(index=index + 1, sequences=sequences, finished=finished, scores=scores, state=state)

    out = jax.lax.while_loop(cond, body, carry)
    return out["sequences"], out["scores"]


# ----------------------------------------------------------------------------- beam search
def gather_beams(state: Any, rows: jax.Array, beam_axes: Any = 0) -> Any:
    """Reorder the per-beam leaves of `state`: leaf.take(rows, axis) for each leaf under an int in
    `beam_axes` (a pytree prefix of state; None marks leaves shared by all beams, left untouched).

    rows: int [N] source row (b * num_beams + k) for every destination row.
    """
    def gather_subtree(axis, subtree):
        if axis is None:
            return subtree
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), subtree)

    return jax.tree.map(gather_subtree, beam_axes, state, is_leaf=lambda x: x is None)


def _take_beams(x: jax.Array, beam_index: jax.Array) -> jax.Array:
    """x [B, K, ...] gathered along axis 1 by beam_index [B, K'] -> [B, K', ...]."""
    index = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _merge_finished(c: dict, top_sequences, fin_candidates, just_finished, early_true, k_beams: int):
    """The K best finished hypotheses [B, K, L], scores [B, K], is_finished [B, K]: the kept ones merged with
    this step's EOS / max-length candidates among the top K (`just_finished` [B, C]) of still-open items."""
    item_full = jnp.all(c["is_finished"], axis=-1, keepdims=True) & early_true
    fin_candidates = fin_candidates + item_full.astype(jnp.float32) * MASK_SCORE
    fin_candidates = fin_candidates + (~c["can_improve"])[:, None].astype(jnp.float32) * MASK_SCORE
    fin_candidates = fin_candidates + (~just_finished).astype(jnp.float32) * MASK_SCORE
    merged_scores = jnp.concatenate([c["finished_scores"], fin_candidates], axis=1)
    finished_scores, fin_pick = jax.lax.top_k(merged_scores, k_beams)
    finished_sequences = _take_beams(jnp.concatenate([c["finished_sequences"], top_sequences], axis=1), fin_pick)
    is_finished = _take_beams(jnp.concatenate([c["is_finished"], just_finished], axis=1), fin_pick)
    return finished_sequences, finished_scores, is_finished


def _beam_start(state: Any, batch_size: int, controls: SearchControls) -> dict:
    """The beam-search loop carry before the first step: every beam [B, K, L] holds only the start token."""
    k_beams, length = controls.num_beams, controls.max_length
    sequences = jnp.full((batch_size, k_beams, length), controls.pad_token_id, jnp.int32)
    sequences = sequences.at[:, :, 0].set(controls.decoder_start_token_id)
    # Only beam 0 is live at first, so the first step does not pick the same token K times.
    running_scores = jnp.zeros((batch_size, k_beams), jnp.float32).at[:, 1:].set(MASK_SCORE)
    return dict(
        index=jnp.int32(0),
        running_sequences=sequences,
        running_scores=running_scores,
        finished_sequences=sequences,
        finished_scores=jnp.full((batch_size, k_beams), MASK_SCORE, jnp.float32),
        is_finished=jnp.zeros((batch_size, k_beams), bool),  # slot holds a real finished hypothesis
        can_improve=jnp.ones((batch_size,), bool),  # HF's is_early_stop_heuristic_unsatisfied (sticky)
        stop=jnp.bool_(False),
        state=state,
    )


def _beam_candidates(c: dict, step_fn: StepFn, controls: SearchControls, num_candidates: int):
    """One decoder step of the running beams [B, K, L] and each input's best `num_candidates` (C)
    continuations: (scores float32 [B, C] (running score + processed log-prob), source beam int [B, C],
    token int32 [B, C], sequences int32 [B, C, L] with the token at `index + 1`, the step function's state)."""
    index, running = c["index"], c["running_sequences"]
    batch_size, k_beams, length = running.shape
    flat_running = running.reshape(batch_size * k_beams, length)
    tokens = jax.lax.dynamic_index_in_dim(flat_running, index, axis=1, keepdims=False)
    logits, state = step_fn(tokens, index, c["state"])
    vocab_size = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_probs = process_scores(log_probs, flat_running, index, controls)
    totals = log_probs.reshape(batch_size, k_beams, vocab_size) + c["running_scores"][:, :, None]
    top_scores, top_flat = jax.lax.top_k(totals.reshape(batch_size, k_beams * vocab_size), num_candidates)
    top_beam, top_token = top_flat // vocab_size, (top_flat % vocab_size).astype(jnp.int32)
    top_sequences = _take_beams(running, top_beam)
    top_sequences = jax.lax.dynamic_update_index_in_dim(top_sequences, top_token, index + 1, axis=2)
    return top_scores, top_beam, top_token, top_sequences, state


def _still_improving(can_improve, running_scores, finished_scores, is_finished, generated, lp, never,
                     length: int) -> jax.Array:
    """bool [B], sticky: can the best running beam still beat the worst finished one? (HF's heuristic, incl.
    "never"; `generated`: the running beams' generated tokens after this step.)"""
    best_len = jnp.where(never & (lp > 0.0), jnp.float32(length - 1), generated)
    best_running = running_scores[:, :1] / best_len ** lp
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), MASK_SCORE)
    return can_improve & jnp.any(best_running > worst_finished, axis=-1)


def beam_search(step_fn: StepFn, state: Any, batch_size: int, controls: SearchControls,
                beam_axes: Any = 0) -> tuple[jax.Array, jax.Array]:
    """Beam search with Hugging Face PyTorch semantics, inside one `lax.while_loop`.

    The step function sees batch_size * num_beams rows ordered b * num_beams + k; `beam_axes` (see
    `gather_beams`) says how to reorder `state` when beams are re-ranked. Returns the finished hypotheses
    best first: sequences int32 [B, num_beams, max_length] (start token first, pad after EOS) and their
    length-penalised scores float32 [B, num_beams] (HF's `sequences_scores`).
    """
    k_beams, length = controls.num_beams, controls.max_length
    # HF keeps enough candidates that num_beams survive even if every EOS id is among the best.
    num_candidates = max(2, 1 + len(controls.eos_token_id)) * k_beams
    lp = jnp.asarray(controls.length_penalty, jnp.float32)
    early_true = controls.early_stopping == EARLY_STOPPING_CODES[True]
    never = controls.early_stopping == EARLY_STOPPING_CODES["never"]
    in_top_k = jnp.arange(num_candidates) < k_beams

    def cond(c):
        return ~c["stop"] & (c["index"] < length - 1)

    def body(c):
        index = c["index"]
        top_scores, top_beam, top_token, top_sequences, state = _beam_candidates(c, step_fn, controls,
                                                                                  num_candidates)
        new_len = index + 2  # decoder length including the candidate token
        hits_stop = is_eos(top_token, controls) | (new_len >= length)

        # Next running beams: the best K candidates that did not stop.
        run_candidates = top_scores + hits_stop.astype(jnp.float32) * MASK_SCORE
        running_scores, run_pick = jax.lax.top_k(run_candidates, k_beams)
        running_sequences = _take_beams(top_sequences, run_pick)
        source_beam = jnp.take_along_axis(top_beam, run_pick, axis=1)

        generated = (index + 1).astype(jnp.float32)  # generated length incl. the new token, excl. start
        just_finished = hits_stop & in_top_k[None, :]
        finished_sequences, finished_scores, is_finished = _merge_finished(
            c, top_sequences, top_scores / generated ** lp, just_finished, early_true, k_beams)

        rows = (jnp.arange(batch_size)[:, None] * k_beams + source_beam).reshape(-1)
        state = gather_beams(state, rows, beam_axes)

        can_improve = _still_improving(c["can_improve"], running_scores, finished_scores, is_finished, generated,
                                       lp, never, length)
        stop = (~jnp.any(can_improve)) | (jnp.all(is_finished) & early_true) | jnp.all(hits_stop)
        return dict(index=index + 1, running_sequences=running_sequences, running_scores=running_scores,
                    finished_sequences=finished_sequences, finished_scores=finished_scores,
                    is_finished=is_finished, can_improve=can_improve, stop=stop, state=state)

    out = jax.lax.while_loop(cond, body, _beam_start(state, batch_size, controls))
    return out["finished_sequences"], out["finished_scores"]


def search(step_fn: StepFn, state: Any, batch_size: int, controls: SearchControls, beam_axes: Any = 0,
           rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Dispatch on the controls: beam search when num_beams > 1, else greedy / sampling.

    The step function must serve batch_size * num_beams rows (beam search) or batch_size *
    num_return_sequences rows (greedy / sampling; each input's samples are adjacent). Returns sequences
    int32 [B, R, max_length] and scores float32 [B, R], R = num_return_sequences, best first for beams.
    (`generate` compiles beam search with R = num_beams and slices outside, so R is not part of its program.)
    """
    r = controls.num_return_sequences
    if controls.num_beams > 1:
        sequences, scores = beam_search(step_fn, state, batch_size, controls, beam_axes)
        return sequences[:, :r], scores[:, :r]
    sequences, scores = greedy_search(step_fn, state, batch_size * r, controls, rng)
    return sequences.reshape(batch_size, r, -1), scores.reshape(batch_size, r)
