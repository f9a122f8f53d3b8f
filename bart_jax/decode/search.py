"""Model-independent decoding: greedy, sampling and beam search over a step function, all on device.

A *step function* is the only thing the searches know about a model:

    step_fn(token_ids int32 [N], index int32 scalar, state) -> (logits float [N, V], state)

`token_ids` holds the token at decoder position `index` for every row (`index` 0 is the decoder start
token); the logits are for position `index + 1`. `state` is any pytree (e.g. a key/value cache). For beam
search the rows are ordered `b * num_beams + k`, and `beam_axes` says which state leaves follow a beam when
beams are reordered (an int axis) and which are shared by all beams of an input (None), e.g. cross-attention
keys/values.

Semantics follow Hugging Face transformers' PyTorch `generate` (v4.57) exactly:
  * logits processors, in this order: no-repeat n-gram, min length, forced BOS, forced EOS; beam search
    applies them to `log_softmax(logits)`, greedy/sampling to the raw logits (then temperature, top-k,
    top-p when sampling);
  * `max_length` / `min_length` count the decoder start token; forced BOS at length 1, forced EOS at
    length `max_length - 1`; n-grams are taken over the whole decoder sequence;
  * any of the EOS ids ends a sequence (min length masks all of them);
  * beam search keeps the top `max(2, 1 + number of EOS ids) * num_beams` candidates; only EOS candidates
    ranked within the top `num_beams` may finish; each batch item finishes on its own; beams reaching
    `max_length` finish; a finished hypothesis scores `sum log p / generated_length ** length_penalty`
    (generated length counts EOS, not the start token); `early_stopping` True / False / "never" as in HF.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

# HF's masking constant: added to scores that must never be selected (kept identical so ties behave alike).
_NEG = -1.0e9
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}
# One compiled program serves every no_repeat_ngram_size up to this (0 included): switching n-gram blocking
# on and off costs no recompile, and the dense mask is cheap next to a decoder step.
MIN_NGRAM_CAPACITY = 4


@struct.dataclass
class SearchControls:
    """Decoding controls; build with `SearchControls.create` (validates, encodes None / early_stopping).

    Static fields shape the compiled program (changing them recompiles): max_length (decoder length incl.
    the start token), eos ids (a tuple: any of them ends a sequence, as HF's list), pad id, num_beams, num_return_sequences, do_sample and ngram_capacity
    (largest no_repeat_ngram_size the program handles, at least MIN_NGRAM_CAPACITY). Every other
    field is a traced value, so one compiled search serves all of them: decoder_start_token_id, length_penalty,
    min_length (counts the start token), early_stopping (0 False, 1 True, 2 "never"), no_repeat_ngram_size,
    forced_bos_token_id / forced_eos_token_id (-1 = off), temperature, top_k (0 = off), top_p.
    """

    max_length: int = struct.field(pytree_node=False)
    eos_token_id: tuple[int, ...] = struct.field(pytree_node=False)
    pad_token_id: int = struct.field(pytree_node=False)
    num_beams: int = struct.field(pytree_node=False, default=1)
    num_return_sequences: int = struct.field(pytree_node=False, default=1)
    do_sample: bool = struct.field(pytree_node=False, default=False)
    ngram_capacity: int = struct.field(pytree_node=False, default=0)
    decoder_start_token_id: Any = 2
    length_penalty: Any = 1.0
    min_length: Any = 0
    early_stopping: Any = 0
    no_repeat_ngram_size: Any = 0
    forced_bos_token_id: Any = -1
    forced_eos_token_id: Any = -1
    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0

    @classmethod
    def create(cls, *, max_length: int, eos_token_id: int | Sequence[int], pad_token_id: int,
               decoder_start_token_id: int,
               num_beams: int = 1, num_return_sequences: int = 1, do_sample: bool = False,
               length_penalty: float = 1.0, min_length: int = 0, early_stopping: bool | str = False,
               no_repeat_ngram_size: int = 0, forced_bos_token_id: int | None = None,
               forced_eos_token_id: int | None = None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, vocab_size: int | None = None) -> "SearchControls":
        """Validated controls with Hugging Face names and meanings; ValueError names a bad control.
        eos_token_id: one id or a non-empty list of ids (HF accepts both)."""

        def bad(field, value, why):
            raise ValueError(f"generation control {field}={value!r}: {why}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def token(field, v, optional=False):
            if optional and v is None:
                return -1
            if not is_int(v) or v < 0 or (vocab_size is not None and v >= vocab_size):
                bad(field, v, f"must be {'None or ' if optional else ''}a token id in [0, vocab_size={vocab_size})")
            return int(v)

        if not is_int(max_length) or max_length < 2:
            bad("max_length", max_length, "must be an integer >= 2 (it counts the decoder start token)")
        ids = {f: token(f, v) for f, v in (("pad_token_id", pad_token_id),
                                           ("decoder_start_token_id", decoder_start_token_id))}
        eos_list = [eos_token_id] if is_int(eos_token_id) else eos_token_id
        if isinstance(eos_list, (str, bytes)) or not isinstance(eos_list, (list, tuple, np.ndarray)) or not len(eos_list):
            bad("eos_token_id", eos_token_id, "must be a token id or a non-empty list of token ids")
        ids["eos_token_id"] = tuple(dict.fromkeys(token("eos_token_id", v) for v in eos_list))
        forced_bos = token("forced_bos_token_id", forced_bos_token_id, optional=True)
        forced_eos = token("forced_eos_token_id", forced_eos_token_id, optional=True)
        if not is_int(num_beams) or num_beams < 1:
            bad("num_beams", num_beams, "must be an integer >= 1")
        if not is_int(num_return_sequences) or num_return_sequences < 1:
            bad("num_return_sequences", num_return_sequences, "must be an integer >= 1")
        if num_beams > 1 and num_return_sequences > num_beams:
            bad("num_return_sequences", num_return_sequences, f"cannot exceed num_beams={num_beams}")
        if num_beams == 1 and num_return_sequences > 1 and not do_sample:
            bad("num_return_sequences", num_return_sequences, "greedy search returns one sequence; use beams or do_sample")
        if do_sample and num_beams > 1:
            bad("do_sample", do_sample, "beam sampling is not supported; use num_beams=1 with do_sample")
        if not any(early_stopping is k for k in (True, False)) and early_stopping != "never":
            bad("early_stopping", early_stopping, "must be True, False or 'never'")
        if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", no_repeat_ngram_size, "must be an integer >= 0 (0 disables it)")
        if not is_int(min_length) or min_length < 0:
            bad("min_length", min_length, "must be an integer >= 0")
        if not is_int(top_k) or top_k < 0:
            bad("top_k", top_k, "must be an integer >= 0 (0 disables it)")
        if not float(temperature) > 0.0:
            bad("temperature", temperature, "must be > 0")
        if not 0.0 < float(top_p) <= 1.0:
            bad("top_p", top_p, "must be in (0, 1]")
        return cls(
            max_length=int(max_length), **ids, num_beams=int(num_beams),
            num_return_sequences=int(num_return_sequences), do_sample=bool(do_sample),
            ngram_capacity=max(no_repeat_ngram_size, MIN_NGRAM_CAPACITY),
            length_penalty=float(length_penalty), min_length=int(min_length),
            early_stopping=EARLY_STOPPING_CODES[early_stopping], no_repeat_ngram_size=int(no_repeat_ngram_size),
            forced_bos_token_id=forced_bos, forced_eos_token_id=forced_eos, temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p))


# ----------------------------------------------------------------------------- logits processors
def is_eos(tokens: jax.Array, controls: SearchControls) -> jax.Array:
    """bool, shape of `tokens`: the token is one of the EOS ids."""
    hit = tokens == controls.eos_token_id[0]
    for eos in controls.eos_token_id[1:]:
        hit = hit | (tokens == eos)
    return hit


def banned_ngram_tokens(sequences: jax.Array, index: jax.Array, ngram_size: jax.Array, capacity: int,
                        vocab_size: int) -> jax.Array:
    """Tokens that would repeat an n-gram already in the sequence (dense, on device).

    sequences: int [N, L], filled at positions 0..index (the rest is ignored); index: scalar, the position
    of the last token; ngram_size: scalar n (traced; 0 = off) with n <= capacity (static). Returns int
    [N, L]: for every earlier n-gram start j whose first n - 1 tokens equal the last n - 1 tokens, the
    token that followed (banned next); `vocab_size` (out of range) elsewhere.
    """
    num_rows, length = sequences.shape
    n = jnp.asarray(ngram_size, jnp.int32)
    starts = jnp.arange(length)  # candidate n-gram start j
    padded = jnp.pad(sequences, ((0, 0), (0, capacity)), constant_values=-1)
    matches = jnp.ones((num_rows, length), bool)
    for i in range(capacity - 1):  # compare token j + i with the i-th of the last n - 1 tokens
        query = jax.lax.dynamic_index_in_dim(padded, jnp.clip(index - n + 2 + i, 0, length - 1), axis=1,
                                             keepdims=True)  # [N, 1]
        matches &= (padded[:, i:i + length] == query) | (i >= n - 1)
    # The whole n-gram j .. j+n-1 must already be generated (none exists while index + 2 <= n, as in HF).
    complete = (starts + n - 1 <= index) & (n > 0)
    followers = jnp.take_along_axis(sequences, jnp.clip(starts + n - 1, 0, length - 1)[None, :].repeat(num_rows, 0),
                                    axis=1)
    return jnp.where(matches & complete[None, :], followers, vocab_size)


def process_scores(scores: jax.Array, sequences: jax.Array, index: jax.Array, controls: SearchControls) -> jax.Array:
    """HF's logits processors for BART, in HF's order: no-repeat n-gram, min length, forced BOS, forced EOS.

    scores: float [N, V] (log-probs for beam search, raw logits for greedy/sampling); sequences: int [N, L]
    holding positions 0..index; the next token goes to position index + 1, so the current length is
    index + 1. Returns float [N, V] with banned tokens at -inf and forced steps one-hot (0 / -inf).
    """
    vocab = jnp.arange(scores.shape[-1])
    cur_len = index + 1
    if controls.ngram_capacity > 0:
        banned = banned_ngram_tokens(sequences, index, controls.no_repeat_ngram_size, controls.ngram_capacity,
                                     scores.shape[-1])
        # One scatter into the scores (out-of-range ids are dropped) instead of a dense [N, V] mask.
        scores = scores.at[jnp.arange(scores.shape[0])[:, None], banned].set(-jnp.inf, mode="drop")
    scores = jnp.where(is_eos(vocab, controls)[None, :] & (cur_len < controls.min_length), -jnp.inf, scores)

    def force(scores, token, at_length):
        one_hot = jnp.where(vocab == token, 0.0, -jnp.inf).astype(scores.dtype)
        return jnp.where((cur_len == at_length) & (token >= 0), one_hot[None, :], scores)

    scores = force(scores, controls.forced_bos_token_id, 1)
    return force(scores, controls.forced_eos_token_id, controls.max_length - 1)


def warp_for_sampling(logits: jax.Array, controls: SearchControls) -> jax.Array:
    """HF's sampling warpers in HF's order: temperature, top-k, top-p (keeping at least one token).

    logits: float [N, V] after `process_scores`. Returns float [N, V] with removed tokens at -inf.
    """
    logits = logits / jnp.asarray(controls.temperature, logits.dtype)
    vocab_size = logits.shape[-1]

    def top_k(logits):
        k = jnp.clip(controls.top_k, 1, vocab_size)
        kth = jax.lax.dynamic_index_in_dim(jnp.sort(logits, axis=-1), vocab_size - k, axis=-1)  # [N, 1]
        return jnp.where(logits < kth, -jnp.inf, logits)

    # Each filter sorts the vocabulary (O(V log V) per row); skip it when it is off.
    logits = jax.lax.cond(jnp.asarray(controls.top_k) > 0, top_k, lambda x: x, logits)

    def nucleus(logits):
        order = jnp.argsort(logits, axis=-1)  # ascending, like HF
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1.0 - controls.top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        return jnp.where(remove, -jnp.inf, logits)

    return jax.lax.cond(jnp.asarray(controls.top_p) < 1.0, nucleus, lambda x: x, logits)


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
    fin_candidates = fin_candidates + item_full.astype(jnp.float32) * _NEG
    fin_candidates = fin_candidates + (~c["can_improve"])[:, None].astype(jnp.float32) * _NEG
    fin_candidates = fin_candidates + (~just_finished).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([c["finished_scores"], fin_candidates], axis=1)
    finished_scores, fin_pick = jax.lax.top_k(merged_scores, k_beams)
    finished_sequences = _take_beams(jnp.concatenate([c["finished_sequences"], top_sequences], axis=1), fin_pick)
    is_finished = _take_beams(jnp.concatenate([c["is_finished"], just_finished], axis=1), fin_pick)
    return finished_sequences, finished_scores, is_finished


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

    sequences = jnp.full((batch_size, k_beams, length), controls.pad_token_id, jnp.int32)
    sequences = sequences.at[:, :, 0].set(controls.decoder_start_token_id)
    # Only beam 0 is live at first, so the first step does not pick the same token K times.
    running_scores = jnp.zeros((batch_size, k_beams), jnp.float32).at[:, 1:].set(_NEG)
    carry = dict(
        index=jnp.int32(0),
        running_sequences=sequences,
        running_scores=running_scores,
        finished_sequences=sequences,
        finished_scores=jnp.full((batch_size, k_beams), _NEG, jnp.float32),
        is_finished=jnp.zeros((batch_size, k_beams), bool),  # slot holds a real finished hypothesis
        can_improve=jnp.ones((batch_size,), bool),  # HF's is_early_stop_heuristic_unsatisfied (sticky)
        stop=jnp.bool_(False),
        state=state,
    )
    in_top_k = jnp.arange(num_candidates) < k_beams

    def cond(c):
        return ~c["stop"] & (c["index"] < length - 1)

    def body(c):
        index = c["index"]
        running = c["running_sequences"]
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
        new_len = index + 2  # decoder length including the candidate token
        hits_stop = is_eos(top_token, controls) | (new_len >= length)

        # Next running beams: the best K candidates that did not stop.
        run_candidates = top_scores + hits_stop.astype(jnp.float32) * _NEG
        running_scores, run_pick = jax.lax.top_k(run_candidates, k_beams)
        running_sequences = _take_beams(top_sequences, run_pick)
        source_beam = jnp.take_along_axis(top_beam, run_pick, axis=1)

        generated = (index + 1).astype(jnp.float32)  # generated length incl. the new token, excl. start
        just_finished = hits_stop & in_top_k[None, :]
        finished_sequences, finished_scores, is_finished = _merge_finished(
            c, top_sequences, top_scores / generated ** lp, just_finished, early_true, k_beams)

        rows = (jnp.arange(batch_size)[:, None] * k_beams + source_beam).reshape(-1)
        state = gather_beams(state, rows, beam_axes)

        # Can the best running beam still beat the worst finished one? (HF's heuristic, incl. "never".)
        cur_generated = generated  # after this step the running beams have index+1 generated tokens
        best_len = jnp.where(never & (lp > 0.0), jnp.float32(length - 1), cur_generated)
        best_running = running_scores[:, :1] / best_len ** lp
        worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
        can_improve = c["can_improve"] & jnp.any(best_running > worst_finished, axis=-1)
        stop = (~jnp.any(can_improve)) | (jnp.all(is_finished) & early_true) | jnp.all(hits_stop)
        return dict(index=index + 1, running_sequences=running_sequences, running_scores=running_scores,
                    finished_sequences=finished_sequences, finished_scores=finished_scores,
                    is_finished=is_finished, can_improve=can_improve, stop=stop, state=state)

    out = jax.lax.while_loop(cond, body, carry)
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
