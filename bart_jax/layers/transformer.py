"""BART encoder and decoder layers, and the scanned stacks that run them.

Both stacks run their layers with `nn.scan` (parameters stacked on a leading 'layers' axis). With
`scan_layers=False` the very same scan is fully unrolled, so both paths share one layer code and one
parameter layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from bart_jax.config import BartConfig
from bart_jax.layers.attention import (Attention, dense_kernel_init, to_cache_layout, write_cache,
                                       zeros_init)


def activation(name: str):
    """BART activations. 'gelu' is the exact erf form (jax.nn.gelu defaults to the tanh approximation)."""
    return {
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }[name]


def layer_norm(config: BartConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance like torch's LayerNorm (flax's fast E[x^2]-E[x]^2 differs in the last bits).
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=config.params_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=zeros_init(("norm",)), name=name)


class FeedForward(nn.Module):
    """fc1 -> activation -> activation dropout -> fc2: [B, T, d] -> [B, T, d]."""

    config: BartConfig
    ffn_dim: int
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(nn.Dense, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        h = dense(self.ffn_dim, kernel_init=dense_kernel_init(cfg, ("embed", "mlp")),
                  bias_init=zeros_init(("mlp",)), name="fc1")(x)
        h = activation(cfg.activation_function)(h)
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=self.deterministic)
        return dense(cfg.d_model, kernel_init=dense_kernel_init(cfg, ("mlp", "embed")),
                     bias_init=zeros_init(("embed",)), name="fc2")(h)


def residual(x, sublayer, norm: nn.LayerNorm, dropout: nn.Dropout, config: BartConfig, deterministic: bool):
    """x + dropout(sublayer(x)) with BART's post-LN (norm after the sum) or the Pre-LN variant (norm first)."""
    h = sublayer(norm(x) if config.normalize_before else x)
    x = x + dropout(h, deterministic=deterministic)
    x = x if config.normalize_before else norm(x)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward. Scan body: (x [B, S, d], None) -> (x, None)."""

    config: BartConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x, _, mask):
        cfg, det = self.config, self.deterministic
        attn = Attention(cfg, cfg.encoder_attention_heads, name="self_attn")
        dropout = nn.Dropout(cfg.dropout)
        x = residual(x, lambda h: attn(h, None, mask, det), layer_norm(cfg, "self_attn_layer_norm"), dropout, cfg, det)
        ffn = FeedForward(cfg, cfg.encoder_ffn_dim, det, name="ffn")
        x = residual(x, ffn, layer_norm(cfg, "final_layer_norm"), dropout, cfg, det)
        return x, None


class DecoderLayer(nn.Module):
    """Causal self-attention + cross-attention + feed-forward, in one of three modes (same parameters).

    - 'full'     (teacher forcing): carry x [B, T, d]; xs None; returns (x, None).
    - 'cross_kv' (cache set-up): carry unused; returns (carry, {'cross_k', 'cross_v'} each [B, N, H, S]
                 or [B, S, N, H]).
    - 'step'     (one cached token): carry (x [B*K, 1, d], self_k, self_v); xs (layer, cross_k, cross_v);
                 cross keys/values are shared by the K beams of an input. Cache leaves are [.., N, H, T]
                 or [.., T, N, H] as `config.decode_layout_for()` says ('bnhs' or 'bsnh'). Under the
                 scan, `layer` is the traced layer index and self_k/self_v are the whole stacked cache
                 [L, B*K, ...] (updated in place at `index`); unrolled, `layer` is None and they are this
                 layer's own [B*K, ...].
    """

    config: BartConfig
    deterministic: bool
    mode: str = "full"

    @nn.compact
    def __call__(self, carry, xs, enc, enc_mask, self_mask, index):
        cfg, det = self.config, self.deterministic
        self_attn = Attention(cfg, cfg.decoder_attention_heads, name="self_attn")
        cross_attn = Attention(cfg, cfg.decoder_attention_heads, name="encoder_attn")
        layout = cfg.decode_layout_for()
        if self.mode == "cross_kv":
            k, v = cross_attn.project(enc, "kv")
            return carry, {"cross_k": to_cache_layout(k, layout), "cross_v": to_cache_layout(v, layout)}

        dropout = nn.Dropout(cfg.dropout)
        if self.mode == "full":
            x = carry

            def self_sublayer(h):
                return self_attn(h, None, self_mask, det)

            def cross_sublayer(h):
                return cross_attn(h, enc, enc_mask, det)
        else:
            x, cache_k, cache_v = carry
            layer, cross_k, cross_v = xs

            def self_sublayer(h):
                nonlocal cache_k, cache_v
                q, k, v = self_attn.project(h, "qkv")  # [B*K, 1, N, H]
                cache_k = write_cache(cache_k, k, index, layout, layer)
                cache_v = write_cache(cache_v, v, index, layout, layer)
                layer_k, layer_v = (cache_k, cache_v) if layer is None else (cache_k[layer], cache_v[layer])
                return self_attn.attend_cached(q, layer_k, layer_v, self_mask, layout)

            def cross_sublayer(h):
                batch = cross_k.shape[0]
                (q,) = cross_attn.project(h, "q")  # [B*K, 1, N, H]
                # The K beams of one input become K query positions over that input's shared keys.
                q = q.reshape(batch, -1, *q.shape[2:])
                out = cross_attn.attend_cached(q, cross_k, cross_v, enc_mask, layout)  # [B, K, d]
                return out.reshape(h.shape)

        x = residual(x, self_sublayer, layer_norm(cfg, "self_attn_layer_norm"), dropout, cfg, det)
        x = residual(x, cross_sublayer, layer_norm(cfg, "encoder_attn_layer_norm"), dropout, cfg, det)
        ffn = FeedForward(cfg, cfg.decoder_ffn_dim, det, name="ffn")
        x = residual(x, ffn, layer_norm(cfg, "final_layer_norm"), dropout, cfg, det)
        if self.mode == "full":
            return x, None
        return (x, cache_k, cache_v), None


def remat_policy(name: str):
    return {
        "full": None,  # save nothing, recompute everything
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


def scanned(layer_cls, config: BartConfig, num_layers: int, num_broadcast: int):
    """`layer_cls` scanned over `num_layers` stacked layers (remat inside the scan when configured)."""
    if config.remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=remat_policy(config.remat_policy), prevent_cse=False)
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * num_broadcast,
        length=num_layers,
        unroll=1 if config.scan_layers else num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def unstack_layers(stacked_params, num_layers: int) -> tuple:
    """A scanned stack's parameters (leaves [num_layers, ...]) as a tuple of per-layer trees (copies)."""
    return tuple(jax.tree.map(lambda leaf, i=i: leaf[i], stacked_params) for i in range(num_layers))


class PositionalEmbedding(nn.Module):
    """Learned positions with BART's offset of 2: position p reads row p + 2 of a [max_pos + 2, d] table."""

    config: BartConfig
    offset: int = 2

    @nn.compact
    def __call__(self, positions):
        """positions int [T] -> [T, d]."""
        cfg = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("positions", "embed")),
            (cfg.max_position_embeddings + self.offset, cfg.d_model), cfg.params_dtype)
        return jnp.take(table, positions + self.offset, axis=0).astype(cfg.compute_dtype)


def check_length(config: BartConfig, length: int, what: str):
    if length > config.max_position_embeddings:
        raise ValueError(f"{what} has length {length}, more than max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate the input or use a config with more positions")


class Encoder(nn.Module):
    """Token embeddings (already looked up and scaled) -> encoder hidden states [B, S, d]."""

    config: BartConfig

    @nn.compact
    def __call__(self, embeds, attention_mask, deterministic: bool):
        cfg = self.config
        check_length(cfg, embeds.shape[1], "encoder input")
        x = embeds + PositionalEmbedding(cfg, name="embed_positions")(jnp.arange(embeds.shape[1]))[None]
        x = layer_norm(cfg, "layernorm_embedding")(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        mask = attention_mask.astype(bool)[:, None, None, :]
        layers = scanned(EncoderLayer, cfg, cfg.encoder_layers, num_broadcast=1)
        x, _ = layers(cfg, deterministic, name="layers")(x, None, mask)
        if cfg.add_final_layer_norm:
            x = layer_norm(cfg, "layer_norm")(x)
        return x


class Decoder(nn.Module):
    """The decoder stack in 'full', 'cross_kv' or 'step' mode (see `DecoderLayer`)."""

    config: BartConfig

    @nn.compact
    def __call__(self, embeds, positions, enc, enc_mask, self_mask, *, mode: str, deterministic: bool,
                 cache=None, index=None, layer_params=None):
        """'step' mode runs the scanned layers over a stacked cache, or with `layer_params` (a sequence of
        per-layer parameter trees, see `unstack_layers`) the same layer code unrolled over those separate
        buffers and a per-layer cache (each leaf a tuple of layers)."""
        cfg = self.config
        layers = scanned(functools.partial(DecoderLayer, mode=mode), cfg, cfg.decoder_layers, num_broadcast=4)
        layers = layers(cfg, deterministic, name="layers")
        if mode == "cross_kv":
            return layers(jnp.zeros(()), None, enc, None, None, None)[1]

        x = embeds + PositionalEmbedding(cfg, name="embed_positions")(positions)[None]
        x = layer_norm(cfg, "layernorm_embedding")(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        if mode == "full":
            x, _ = layers(x, None, enc, enc_mask, self_mask, None)
        elif layer_params is None:
            xs = (jnp.arange(cfg.decoder_layers), cache["cross_k"], cache["cross_v"])
            (x, k, v), _ = layers((x, cache["self_k"], cache["self_v"]), xs, None, enc_mask, self_mask, index)
            cache = {**cache, "self_k": k, "self_v": v}
        else:
            # Inside a while loop a scan slices each layer's weights out of the stacked arrays every step
            # (a copy as large as the weights); separate per-layer buffers (weights and cache) are read in place.
            if len(layer_params) != cfg.decoder_layers:
                raise ValueError(f"layer_params has {len(layer_params)} layers; the config has {cfg.decoder_layers}")
            layer = DecoderLayer(cfg, deterministic, mode="step", parent=None)
            new_k, new_v = [], []
            for i, params in enumerate(layer_params):
                carry = (x, cache["self_k"][i], cache["self_v"][i])
                xs = (None, cache["cross_k"][i], cache["cross_v"][i])
                (x, k, v), _ = layer.apply({"params": params}, carry, xs, None, enc_mask, self_mask, index)
                new_k.append(k)
                new_v.append(v)
            cache = {**cache, "self_k": tuple(new_k), "self_v": tuple(new_v)}
        if cfg.add_final_layer_norm:
            x = layer_norm(cfg, "layer_norm")(x)
        return x, cache
