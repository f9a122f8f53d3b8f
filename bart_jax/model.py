"""The BART encoder-decoder as one linen module, plus parameter initialisation helpers.

`Bart(config).apply({'params': params}, input_ids, attention_mask, decoder_input_ids,
decoder_attention_mask, deterministic=True)` returns float32 logits [B, T, vocab_size]. Methods
`encode`, `decode`, `init_cache` and `decode_step` expose the pieces generation needs.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from bart_jax.config import BartConfig
from bart_jax.layers.attention import cache_length_axis, cache_shape, zeros_init
from bart_jax.layers.transformer import Decoder, Encoder, check_length, unstack_layers


def shift_tokens_right(labels, pad_token_id: int, decoder_start_token_id: int):
    """Decoder inputs from targets, BART's convention: `[start, y_0, ..., y_{T-2}]`.

    labels: int [B, T] (may hold -100 for ignored positions, which become pad). Returns int32 [B, T]:
    a NumPy array for a NumPy input (input pipelines stay off the accelerator), else a jax.Array.
    """
    xp = np if isinstance(labels, np.ndarray) else jnp
    labels = xp.asarray(labels)
    shifted = xp.concatenate(
        [xp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return xp.where(shifted == -100, pad_token_id, shifted).astype(xp.int32)


def decoder_inputs(labels, pad_token_id: int, decoder_start_token_id: int) -> dict:
    """The decoder half of a model batch, one convention for pretraining noise and fine-tuning data.

    labels: int [B, T]. Returns int32 [B, T] arrays (NumPy for a NumPy input): 'decoder_input_ids' =
    shift_tokens_right(labels) and 'decoder_attention_mask' = decoder_input_ids != pad. The mask marks
    the decoder's own inputs (the keys it masks), as the Hugging Face reference fixtures do; position 0
    (the start token) is always on, so no row is fully masked, not even an all-pad label row.
    """
    decoder_input_ids = shift_tokens_right(labels, pad_token_id, decoder_start_token_id)
    return {"decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": (decoder_input_ids != pad_token_id).astype(decoder_input_ids.dtype)}


def causal_mask(decoder_attention_mask):
    """bool [B, 1, T, T]: query t may attend key s iff s <= t and key s is not padding."""
    length = decoder_attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None, None] & decoder_attention_mask.astype(bool)[:, None, None, :]


class Bart(nn.Module):
    """BART (or its Pre-LN variant) with a shared, tied token embedding and `final_logits_bias`."""

    config: BartConfig

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(
            cfg.padded_vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="shared")
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
                (cfg.padded_vocab_size, cfg.d_model), cfg.params_dtype)
        self.final_logits_bias = self.param(
            "final_logits_bias", zeros_init(("vocab",)), (cfg.padded_vocab_size,), cfg.params_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _embed(self, ids):
        scale = self.config.d_model ** 0.5 if self.config.scale_embedding else 1.0
        # The lookup reads a table split over 'vocab' only: with its 'embed' dimension split over fsdp too,
        # the partitioner cannot move the looked-up rows onto the batch shards without a full
        # rematerialization (XLA warns so with both fsdp and tensor axes).
        table = nn.with_logical_constraint(self.shared.embedding.astype(self.config.compute_dtype), ("vocab", None))
        return jnp.take(table, ids, axis=0) * jnp.asarray(scale, self.config.compute_dtype)

    def _logits(self, hidden):
        """hidden [..., d] -> float32 logits [..., vocab_size] (tied projection + final_logits_bias)."""
        table, out_dtype = self._logits_table(hidden)
        logits = jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=out_dtype)
        return self._finish_logits(logits)

    def _step_logits(self, hidden):
        """One decoding step's hidden [rows, d] -> float32 logits [rows, vocab_size], as `_logits`.

        In a program lowered for CPU the product is computed transposed, [vocab, rows], and transposed back:
        for the few rows of a step XLA's CPU matmul then streams the [vocab, d] table at close to memory
        bandwidth (the barrier stops XLA from folding the transpose back in)."""
        table, out_dtype = self._logits_table(hidden)

        def vocab_major(hidden, table):
            logits = jnp.einsum("vd,md->vm", table, hidden, preferred_element_type=out_dtype)
            return jax.lax.optimization_barrier(logits).T

        def rows_major(hidden, table):
            return jnp.einsum("md,vd->mv", hidden, table, preferred_element_type=out_dtype)

        return self._finish_logits(jax.lax.platform_dependent(hidden, table, cpu=vocab_major, default=rows_major))

    def _logits_table(self, hidden):
        """The output embedding [padded vocab, d] in hidden's dtype, and the logits dtype: float32, or
        float64 for verification."""
        table = self.shared.embedding if self.config.tie_word_embeddings else self.lm_head
        return table.astype(hidden.dtype), jnp.promote_types(hidden.dtype, jnp.float32)

    def _finish_logits(self, logits):
        """+ final_logits_bias, cut to the logical vocabulary."""
        logits = logits + self.final_logits_bias.astype(logits.dtype)
        return logits[..., : self.config.vocab_size]

    def encode(self, input_ids, attention_mask, deterministic: bool = True):
        """input_ids, attention_mask int [B, S] -> encoder hidden states [B, S, d] (compute dtype)."""
        chex.assert_rank(input_ids, 2)
        chex.assert_equal_shape([input_ids, attention_mask])
        return self.encoder(self._embed(input_ids), attention_mask, deterministic)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, decoder_attention_mask=None,
               deterministic: bool = True):
        """Teacher-forced decoder: ids [B, T], encoder hidden [B, S, d], mask [B, S] -> f32 logits [B, T, V]."""
        chex.assert_rank([decoder_input_ids, encoder_hidden, encoder_mask], [2, 3, 2])
        chex.assert_equal_shape_prefix([encoder_hidden, encoder_mask], 2)
        length = decoder_input_ids.shape[1]
        check_length(self.config, length, "decoder input")
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        hidden, _ = self.decoder(
            self._embed(decoder_input_ids), jnp.arange(length), encoder_hidden,
            encoder_mask.astype(bool)[:, None, None, :], causal_mask(decoder_attention_mask),
            mode="full", deterministic=deterministic)
        return self._logits(hidden)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 deterministic: bool = True):
        """Full forward: f32 logits [B, T, vocab_size]."""
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic)

    def init_cache(self, encoder_hidden, encoder_mask, num_beams: int, max_length: int, per_layer: bool = False):
        """Decoding cache for `num_beams` beams per input and up to `max_length` decoder positions.

        Returns {'self_k', 'self_v': zeros [L, B*K, N, H, max_length], 'cross_k', 'cross_v': [L, B, N, H, S]}
        in the "bnhs" decode layout, or [L, B*K, max_length, N, H] and [L, B, S, N, H] in the "bsnh" one
        (`config.decode_layout_for()`); with per_layer each leaf is a tuple of L
        per-layer arrays (the cache of the unrolled `decode_step`). Cross-attention keys/values are
        computed here once per input, at batch size B.
        """
        cfg = self.config
        check_length(cfg, max_length, "max_length")
        del encoder_mask  # cross keys/values do not depend on it; kept for a uniform signature
        cross = self.decoder(None, None, encoder_hidden, None, None, mode="cross_kv", deterministic=True)
        batch = encoder_hidden.shape[0]
        heads = cfg.decoder_attention_heads
        per_layer_shape = cache_shape(batch * num_beams, max_length, heads, cfg.d_model // heads,
                                      cfg.decode_layout_for())
        zeros = jnp.zeros((cfg.decoder_layers, *per_layer_shape), cfg.compute_dtype)
        cache = {"self_k": zeros, "self_v": zeros, **cross}
        if per_layer:
            cache = {name: tuple(leaf) for name, leaf in cache.items()}
        return cache

    def decode_step(self, token_ids, index, cache, encoder_mask, layer_params=None):
        """One cached decoder step.

        token_ids int [B*K]: the token at decoder position `index` (scalar; 0 holds the start token).
        encoder_mask int [B, S]. layer_params: None runs the scan over the stacked decoder layers and a
        stacked cache; the per-layer trees of `decoder_layer_params(params)` run the same layers unrolled
        over separate weight buffers and a per-layer cache (`init_cache(..., per_layer=True)`): faster
        inside a decoding loop, where the scan slices (copies) every layer's weights at every step.
        Returns (f32 logits [B*K, vocab_size] for position index + 1, new cache).
        """
        chex.assert_rank(token_ids, 1)
        layout = self.config.decode_layout_for()
        max_length = jax.tree.leaves(cache["self_v"])[0].shape[cache_length_axis(layout)]
        self_mask = (jnp.arange(max_length) <= index)[None, None, None, :]
        hidden, cache = self.decoder(
            self._embed(token_ids[:, None]), jnp.reshape(index, (1,)), None,
            encoder_mask.astype(bool)[:, None, None, :], self_mask,
            mode="step", deterministic=True, cache=cache, index=index, layer_params=layer_params)
        return self._step_logits(hidden[:, 0]), cache


def decoder_layer_params(config: BartConfig, params) -> tuple:
    """The decoder's stacked layer parameters as a tuple of per-layer trees (for `Bart.decode_step`)."""
    return unstack_layers(params["decoder"]["layers"], config.decoder_layers)


def _dummy_inputs(config: BartConfig):
    ids = jnp.full((1, 4), config.eos_token_id, jnp.int32)
    return ids, jnp.ones_like(ids), ids


def _boxed_init(config: BartConfig, rng):
    return Bart(config).init({"params": rng}, *_dummy_inputs(config), deterministic=True)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(config: BartConfig, rng):
    return nn.meta.unbox(_boxed_init(config, rng))


def init_params(config: BartConfig, rng=None):
    """Freshly initialised parameters (plain arrays in `param_dtype`), init as Hugging Face BART does:
    normal(init_std) weights, zero biases, unit LayerNorm scales."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _jit_init(config, rng)


def param_logical_axes(config: BartConfig):
    """The parameter tree with a `PartitionSpec` of logical axis names per leaf (no arrays allocated)."""
    boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.PRNGKey(0)))
    return nn.get_partition_spec(boxed)


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
