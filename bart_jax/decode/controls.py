"""Decoding controls and what they do to a step's scores, all on device.

`SearchControls` holds Hugging Face's generation controls (validated by `SearchControls.create`);
`process_scores` applies HF's logits processors for BART and `warp_for_sampling` its sampling warpers, with
HF PyTorch `generate` (v4.57) semantics:
  * logits processors, in this order: no-repeat n-gram, min length, forced BOS, forced EOS; beam search
    applies them to `log_softmax(logits)`, greedy/sampling to the raw logits (then temperature, top-k,
    top-p when sampling);
  * `max_length` / `min_length` count the decoder start token; forced BOS at length 1, forced EOS at
    length `max_length - 1`; n-grams are taken over the whole decoder sequence;
  * any of the EOS ids ends a sequence (min length masks all of them).
The searches that use them are in bart_jax.decode.search.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}
# One compiled program serves every no_repeat_ngram_size up to this (0 included): switching n-gram blocking
# on and off costs no recompile, and the dense mask is cheap next to a decoder step.
MIN_NGRAM_CAPACITY = 4


@struct.dataclass
class SearchControls:
    """Decoding controls; build with `SearchControls.create` (validates, encodes None / early_stopping).

    Static fields shape the compiled program (changing them recompiles): max_length (decoder length incl.
    the start token), eos ids (a tuple: any of them ends a sequence, as HF's list), pad id, num_beams,
    num_return_sequences, do_sample and ngram_capacity (largest no_repeat_ngram_size the program handles, at
    least MIN_NGRAM_CAPACITY). Every other field is a traced value, so one compiled search serves all of them:
    decoder_start_token_id, length_penalty, min_length (counts the start token), early_stopping (0 False,
    1 True, 2 "never"), no_repeat_ngram_size, forced_bos_token_id / forced_eos_token_id (-1 = off),
    temperature, top_k (0 = off), top_p.
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
        if not _is_int(max_length) or max_length < 2:
            _bad("max_length", max_length, "must be an integer >= 2 (it counts the decoder start token)")
        ids = {f: _token(f, v, vocab_size) for f, v in (("pad_token_id", pad_token_id),
                                                        ("decoder_start_token_id", decoder_start_token_id))}
        ids["eos_token_id"] = _eos_ids(eos_token_id, vocab_size)
        forced_bos = _token("forced_bos_token_id", forced_bos_token_id, vocab_size, optional=True)
        forced_eos = _token("forced_eos_token_id", forced_eos_token_id, vocab_size, optional=True)
        _check_other_controls(num_beams, num_return_sequences, do_sample, early_stopping, no_repeat_ngram_size,
                              min_length, top_k, temperature, top_p)
        return cls(
            max_length=int(max_length), **ids, num_beams=int(num_beams),
            num_return_sequences=int(num_return_sequences), do_sample=bool(do_sample),
            ngram_capacity=max(no_repeat_ngram_size, MIN_NGRAM_CAPACITY),
            length_penalty=float(length_penalty), min_length=int(min_length),
            early_stopping=EARLY_STOPPING_CODES[early_stopping], no_repeat_ngram_size=int(no_repeat_ngram_size),
            forced_bos_token_id=forced_bos, forced_eos_token_id=forced_eos, temperature=float(temperature),
            top_k=int(top_k), top_p=float(top_p))


def _bad(field, value, why):
    raise ValueError(f"generation control {field}={value!r}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _token(field: str, v, vocab_size: int | None, optional: bool = False) -> int:
    """A token-id control as an int (-1 for an optional one given as None)."""
    if optional and v is None:
        return -1
    if not _is_int(v) or v < 0 or (vocab_size is not None and v >= vocab_size):
        _bad(field, v, f"must be {'None or ' if optional else ''}a token id in [0, vocab_size={vocab_size})")
    return int(v)


def _eos_ids(eos_token_id, vocab_size: int | None) -> tuple[int, ...]:
    """One EOS id or a non-empty list of them, as a tuple without repeats (in the given order)."""
    eos_list = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if (isinstance(eos_list, (str, bytes)) or not isinstance(eos_list, (list, tuple, np.ndarray))
            or not len(eos_list)):
        _bad("eos_token_id", eos_token_id, "must be a token id or a non-empty list of token ids")
    return tuple(dict.fromkeys(_token("eos_token_id", v, vocab_size) for v in eos_list))


def _check_other_controls(num_beams, num_return_sequences, do_sample, early_stopping, no_repeat_ngram_size,
                          min_length, top_k, temperature, top_p) -> None:
    """ValueError naming the first bad control among those that are not token ids."""
    if not _is_int(num_beams) or num_beams < 1:
        _bad("num_beams", num_beams, "must be an integer >= 1")
    if not _is_int(num_return_sequences) or num_return_sequences < 1:
        _bad("num_return_sequences", num_return_sequences, "must be an integer >= 1")
    if num_beams > 1 and num_return_sequences > num_beams:
        _bad("num_return_sequences", num_return_sequences, f"cannot exceed num_beams={num_beams}")
    if num_beams == 1 and num_return_sequences > 1 and not do_sample:
        _bad("num_return_sequences", num_return_sequences,
             "greedy search returns one sequence; use beams or do_sample")
    if do_sample and num_beams > 1:
        _bad("do_sample", do_sample, "beam sampling is not supported; use num_beams=1 with do_sample")
    if not any(early_stopping is k for k in (True, False)) and early_stopping != "never":
        _bad("early_stopping", early_stopping, "must be True, False or 'never'")
    if not _is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        _bad("no_repeat_ngram_size", no_repeat_ngram_size, "must be an integer >= 0 (0 disables it)")
    if not _is_int(min_length) or min_length < 0:
        _bad("min_length", min_length, "must be an integer >= 0")
    if not _is_int(top_k) or top_k < 0:
        _bad("top_k", top_k, "must be an integer >= 0 (0 disables it)")
    if not float(temperature) > 0.0:
        _bad("temperature", temperature, "must be > 0")
    if not 0.0 < float(top_p) <= 1.0:
        _bad("top_p", top_p, "must be in (0, 1]")


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
