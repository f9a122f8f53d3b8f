"""BART generation: `generate` (ids in, ids out, one jitted program), `generate_texts` (a stream of texts in,
texts and scores out) and `summarize` (texts in, best texts out).

The compiled program runs the encoder once, builds the decoder cache (cross-attention keys/values once per
input, shared by its beams), then the whole search in one `lax.while_loop`. It is compiled once per
(config, batch, source length, static controls); `length_penalty`, `min_length`, `temperature` and `top_p`
are traced values, and `pad_batch` buckets inputs so a stream of documents reuses a few compiled programs.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.config import BartConfig
from bart_jax.data.text import bucket_boundaries, padded_length
from bart_jax.decode.search import SearchControls, search
from bart_jax.layers.transformer import check_length

logger = logging.getLogger(__name__)


def cache_beam_axes(per_layer: bool) -> dict:
    """Beam axis of the cache leaves that follow a beam when beams are re-ranked (stacked cache: after the
    layer axis; per-layer cache: first); cross-attention K/V are shared per input (None)."""
    axis = 0 if per_layer else 1
    return {"self_k": axis, "self_v": axis, "cross_k": None, "cross_v": None}


# Hugging Face's default when neither max_length nor max_new_tokens is given: 20 new tokens.
DEFAULT_MAX_NEW_TOKENS = 20
SMALLEST_SOURCE_BUCKET = 16  # `pad_batch` pads source lengths to powers of two from here


def _early_stopping(text: str):
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise ValueError(f"expected true, false or never, got {text!r}")
    return value


def _token_or_none(text: str):
    return None if text.lower() == "none" else int(text)


def _token_ids(text: str):
    """'2' -> 2, '2,50' -> [2, 50] (HF's eos_token_id takes a list)."""
    ids = [int(t) for t in text.split(",")]
    return ids[0] if len(ids) == 1 else ids


class Control(NamedTuple):
    """One generation control: how its command-line value is parsed (`flag`: a switch taking no value)."""

    parse: Any
    help: str
    flag: bool = False


# The one registry of generation controls (Hugging Face names and meanings): `generate`, presets and the
# `bart-jax generate|evaluate` options all come from here. A new control also needs its field in
# `SearchControls` (validated in `SearchControls.create`) unless `resolve_controls` translates it.
GENERATION_CONTROLS: dict[str, Control] = {
    "num_beams": Control(int, "beams; 1 = greedy (or sampling)"),
    "max_length": Control(int, "longest output, counting the decoder start token"),
    "max_new_tokens": Control(int, "longest output, not counting the start token (wins over max_length)"),
    "min_length": Control(int, "no EOS before this length (counts the start token)"),
    "min_new_tokens": Control(int, "no EOS before this many new tokens (wins over min_length)"),
    "length_penalty": Control(float, "beam score = sum log p / length ** length_penalty"),
    "early_stopping": Control(_early_stopping, "beam search: true, false or never"),
    "no_repeat_ngram_size": Control(int, "never repeat an n-gram of this size (0 = off)"),
    "forced_bos_token_id": Control(_token_or_none, "token forced first after the start token (none = off)"),
    "forced_eos_token_id": Control(_token_or_none, "token forced at max_length (none = off)"),
    "decoder_start_token_id": Control(int, "first decoder token (default: the model's)"),
    "num_return_sequences": Control(int, "sequences returned per input"),
    "do_sample": Control(bool, "sample instead of greedy decoding", flag=True),
    "temperature": Control(float, "sampling temperature"),
    "top_k": Control(int, "sample among the k most likely tokens (0 = off)"),
    "top_p": Control(float, "nucleus sampling mass (1 = off)"),
    "eos_token_id": Control(_token_ids, "end-of-sequence id, or ids comma-separated (default: the model's)"),
    "pad_token_id": Control(int, "id written after EOS (default: the model's)"),
    "bos_token_id": Control(int, "accepted as in HF; BART starts from decoder_start_token_id"),
}
CONTROL_NAMES = tuple(GENERATION_CONTROLS)


class GenerateOutput(NamedTuple):
    """sequences: int32 [B, R, max_length], decoder start token first, pad after EOS;
    scores: float32 [B, R]. Beam search: HF's `sequences_scores` (sum log-prob / generated_length **
    length_penalty), best first. Greedy / sampling: summed log-probabilities of the generated tokens."""

    sequences: jax.Array
    scores: jax.Array


def resolve_controls(config: BartConfig, **controls) -> SearchControls:
    """Turn user controls (HF names and meanings) into validated `SearchControls`.

    Defaults follow HF `generate` with a BART model config: greedy, max_length = 1 + 20 new tokens (capped
    at max_position_embeddings), forced BOS/EOS and decoder start from `config`. `max_new_tokens` /
    `min_new_tokens` take precedence over `max_length` / `min_length` and exclude the start token.
    Hugging Face's special-id keywords: `eos_token_id` (an id or a list of ids, any of which ends a
    sequence), `pad_token_id` (written after EOS) and `bos_token_id` (validated; HF starts the decoder
    from it only when there is no decoder_start_token_id, which a BartConfig always has, so as in HF it
    does not change BART's output); None or absent means the config's.
    """
    unknown = sorted(set(controls) - set(CONTROL_NAMES))
    if unknown:
        raise ValueError(f"unknown generation control(s) {unknown}; expected some of {list(CONTROL_NAMES)}")
    c = {k: v for k, v in controls.items() if v is not None or k in ("forced_bos_token_id", "forced_eos_token_id")}
    eos = c.pop("eos_token_id", config.eos_token_id)
    pad = c.pop("pad_token_id", config.pad_token_id)
    bos = c.pop("bos_token_id", config.bos_token_id)
    max_new, min_new = c.pop("max_new_tokens", None), c.pop("min_new_tokens", None)
    if max_new is not None:
        c["max_length"] = int(max_new) + 1
    elif "max_length" not in c:
        c["max_length"] = min(DEFAULT_MAX_NEW_TOKENS + 1, config.max_position_embeddings)
    if min_new is not None:
        c["min_length"] = int(min_new) + 1
    if c["max_length"] > config.max_position_embeddings:
        raise ValueError(f"generation control max_length={c['max_length']} exceeds the decoder's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    c.setdefault("forced_bos_token_id", config.forced_bos_token_id)
    c.setdefault("forced_eos_token_id", config.forced_eos_token_id)
    c.setdefault("decoder_start_token_id", config.decoder_start_token_id)
    if isinstance(bos, bool) or not (isinstance(bos, (int, np.integer)) and 0 <= bos < config.vocab_size):
        raise ValueError(f"generation control bos_token_id={bos!r}: must be a token id in "
                         f"[0, vocab_size={config.vocab_size})")
    return SearchControls.create(eos_token_id=eos, pad_token_id=pad, vocab_size=config.vocab_size, **c)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("scan_decoder",))
def generate_ids(config: BartConfig, params, input_ids, attention_mask, controls: SearchControls, rng,
                 scan_decoder: bool = False):
    """The compiled generation program (see `generate`); `controls` come from `resolve_controls`.

    input_ids, attention_mask: int [B, S]; rng: PRNG key (used only when sampling).
    Returns GenerateOutput(sequences int32 [B, R, max_length], scores float32 [B, R]).
    """
    from bart_jax.model import Bart, decoder_layer_params

    model = Bart(config)
    variables = {"params": params}
    encoder_hidden = model.apply(variables, input_ids, attention_mask, method="encode")
    # Beams (or, when sampling, the R samples of one input) share that input's cross-attention K/V.
    rows_per_input = controls.num_beams if controls.num_beams > 1 else controls.num_return_sequences
    cache = model.apply(variables, encoder_hidden, attention_mask, rows_per_input, controls.max_length,
                        not scan_decoder, method="init_cache")

    # Per-layer weight buffers, split once per call outside the search loop (see `Bart.decode_step`).
    layer_params = None if scan_decoder else decoder_layer_params(config, params)

    def step_fn(token_ids, index, cache):
        return model.apply(variables, token_ids, index, cache, attention_mask, layer_params,
                           method="decode_step")

    beam_axes = cache_beam_axes(per_layer=not scan_decoder)
    sequences, scores = search(step_fn, cache, input_ids.shape[0], controls, beam_axes, rng)
    return GenerateOutput(sequences, scores)


def params_platform(params) -> str:
    """The platform of the devices holding `params`, where jit compiles a program over them ('cpu', 'gpu',
    'tpu'); jax's default backend for host (NumPy) parameters."""
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return next(iter(leaf.sharding.device_set)).platform
    return jax.default_backend()


def generate(config: BartConfig, params, input_ids, attention_mask=None, *, rng=None, scan_decoder: bool = False,
             **controls) -> GenerateOutput:
    """Generate with Hugging Face PyTorch `generate` semantics for BART, as one jitted program.

    input_ids: int [B, S]; attention_mask: int [B, S] (1 = real token; default: input_ids != pad).
    controls: num_beams, max_length | max_new_tokens, min_length | min_new_tokens, length_penalty,
    early_stopping (True/False/"never"), no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id,
    decoder_start_token_id, num_return_sequences, do_sample, temperature, top_k, top_p, and HF's special-id
    keywords eos_token_id (int or list), pad_token_id, bos_token_id (see `resolve_controls`); rng: PRNG key for
    sampling (default PRNGKey(0)). scan_decoder: run the cached decoder as a scan over the stacked layers
    (one compiled layer body: for very deep decoders where compile time matters) instead of the default
    unrolled layers over per-layer weight buffers split once per call (no per-step weight copies; MaxText
    serves unscanned layers for the same reason). Same results either way.
    The decoding cache's layout ("auto") is chosen for the platform of the devices holding `params`.
    Returns GenerateOutput(sequences int32 [B, R, max_length] with the decoder start token first and pad
    after EOS, scores float32 [B, R]).
    """
    config = config.for_platform(params_platform(params))
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:  # like HF: the pad id of this call
        pad = controls.get("pad_token_id")
        attention_mask = (input_ids != (config.pad_token_id if pad is None else pad)).astype(jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    check_length(config, input_ids.shape[1], "input_ids")
    resolved = resolve_controls(config, **controls)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if resolved.num_beams == 1:
        return generate_ids(config, params, input_ids, attention_mask, resolved, rng, scan_decoder=scan_decoder)
    # Beam search keeps all num_beams hypotheses anyway; slicing here keeps R out of the compiled program.
    out = generate_ids(config, params, input_ids, attention_mask,
                       resolved.replace(num_return_sequences=resolved.num_beams), rng, scan_decoder=scan_decoder)
    r = resolved.num_return_sequences
    return GenerateOutput(out.sequences[:, :r], out.scores[:, :r])


# ----------------------------------------------------------------------------- presets and bucketing
def load_generation_preset(name_or_path: str) -> dict[str, Any]:
    """Controls from a bundled preset in configs/generation (e.g. 'cnn_dm', 'xsum', 'default') or a
    YAML path."""
    from bart_jax import configs

    path, controls = configs.read_mapping(name_or_path, configs.GENERATION, "a mapping of generation controls")
    unknown = sorted(set(controls) - set(CONTROL_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown generation control(s) {unknown}; expected some of {list(CONTROL_NAMES)}")
    return controls


def source_limit(config: BartConfig, max_source_length: int | None = None) -> int:
    """The most source tokens a row keeps: `max_source_length`, at most the model's positions."""
    return min(max_source_length or config.max_position_embeddings, config.max_position_embeddings)


def pad_batch(id_lists: Sequence[Sequence[int]], config: BartConfig, batch_size: int,
              max_source_length: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Pack token-id lists into a fixed-shape batch so every batch of a stream reuses a compiled program.

    Rows longer than `max_source_length` (default max_position_embeddings) are truncated keeping their last
    token (EOS); the length is padded to the next power of two from 16 (capped at the limit: the input
    pipeline's `bucket_boundaries`); missing rows are filled with `<s></s>` dummies.
    Returns (input_ids int32 [batch_size, S], attention_mask int32 [batch_size, S], number of real rows).
    """
    limit = source_limit(config, max_source_length)
    if not 0 < len(id_lists) <= batch_size:
        raise ValueError(f"pad_batch got {len(id_lists)} rows for batch_size={batch_size}")
    rows = []
    for i, ids in enumerate(id_lists):
        ids = list(ids)
        if not ids:
            raise ValueError(f"row {i} has no tokens")
        if max(ids) >= config.vocab_size or min(ids) < 0:
            raise ValueError(f"row {i} has token id {max(ids) if max(ids) >= config.vocab_size else min(ids)} "
                             f"outside the model's vocabulary [0, {config.vocab_size})")
        rows.append(ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:])
    length = padded_length(max(len(r) for r in rows), bucket_boundaries(limit, SMALLEST_SOURCE_BUCKET))
    input_ids = np.full((batch_size, length), config.pad_token_id, np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    for i in range(batch_size):
        row = rows[i] if i < len(rows) else [config.bos_token_id, config.eos_token_id]
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask, len(rows)


def strip_special(sequence: Sequence[int], config: BartConfig, controls: SearchControls | None = None) -> list[int]:
    """Generated ids -> content ids: drop the start token, cut at the first EOS, drop pad/BOS.
    controls: the resolved controls the sequence was generated with (their EOS ids and pad id; default the
    config's)."""
    eos = set(controls.eos_token_id) if controls is not None else {config.eos_token_id}
    pad = controls.pad_token_id if controls is not None else config.pad_token_id
    out = []
    for token in np.asarray(sequence).tolist()[1:]:
        if token in eos:
            break
        if token not in (pad, config.pad_token_id, config.bos_token_id):
            out.append(token)
    return out


def generate_texts(documents: Iterable[str], config: BartConfig, params, tokenizer, *, batch_size: int = 8,
                   max_source_length: int | None = None, rng=None,
                   **controls) -> Iterator[tuple[list[str], list[float]]]:
    """Stream `(texts, scores)` per document, the R returned sequences best first, with `generate`.

    tokenizer: has `encode_batch(texts) -> list[list[int]]` (ids incl. `<s>`/`</s>`) and
    `decode_batch(id_lists) -> list[str]`. Documents are read `batch_size` at a time and padded to fixed
    shapes (`pad_batch`), so a long stream compiles at most once per length bucket. rng: PRNG key for
    sampling (default PRNGKey(0)), folded with the batch index so batches draw different samples.
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    resolved = resolve_controls(config, **controls)
    iterator = iter(documents)
    limit, truncated, seen = source_limit(config, max_source_length), 0, 0
    for step in itertools.count():
        batch = list(itertools.islice(iterator, batch_size))
        if not batch:
            if truncated:
                logger.warning("%d of %d documents were longer than %d tokens and were truncated to their first "
                               "%d (--max-source-length / the model's positions)", truncated, seen, limit, limit)
            return
        encoded = tokenizer.encode_batch(batch)
        truncated += sum(len(ids) > limit for ids in encoded)
        seen += len(encoded)
        input_ids, mask, real = pad_batch(encoded, config, batch_size, max_source_length)
        out = generate(config, params, input_ids, mask, rng=jax.random.fold_in(rng, step), **controls)
        sequences, scores = np.asarray(out.sequences[:real]), np.asarray(out.scores[:real])
        for row_sequences, row_scores in zip(sequences, scores):
            texts = tokenizer.decode_batch([strip_special(s, config, resolved) for s in row_sequences])
            yield texts, [float(s) for s in row_scores]


def summarize(texts: Sequence[str], config: BartConfig, params, tokenizer, *, batch_size: int = 8,
              max_source_length: int | None = None, rng=None, **controls) -> list[str]:
    """Summaries of `texts`, one per text (the best sequence): `generate_texts` collected."""
    return [best for (best, *_), _ in generate_texts(texts, config, params, tokenizer, batch_size=batch_size,
                                                      max_source_length=max_source_length, rng=rng, **controls)]
