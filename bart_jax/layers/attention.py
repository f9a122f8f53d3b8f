"""Multi-head attention for BART: encoder self-attention, causal decoder self-attention and cross-attention.

One module serves all three; what differs is the mask and where keys/values come from. Shapes use
B batch, T query length, S key length, N heads, H head size, d model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from bart_jax.config import BartConfig

# Masked logits use a large finite negative, never -inf: a fully padded row must give a finite (uniform)
# softmax, not NaN (the Hugging Face Flax port produced NaN there).
MASK_VALUE = -1e9


def dense_kernel_init(config: BartConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


def zeros_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


def dot_product_attention(q, k, v, mask, config: BartConfig, deterministic: bool, dropout_module=None):
    """softmax(q k^T / sqrt(H) masked) v.

    q: [B, T, N, H]; k, v: [B, S, N, H]; mask: bool broadcastable to [B, N, T, S] (True = attend).
    Returns [B, T, N, H]. Goes through `jax.nn.dot_product_attention` (so XLA may pick cuDNN's fused
    kernel on GPU) unless attention dropout is active, which that API does not offer.
    """
    dropout = config.attention_dropout > 0.0 and not deterministic
    # jax.nn.dot_product_attention takes its softmax in float32; float64 (used to verify exactness) and
    # attention dropout go through this explicit path.
    if dropout or q.dtype == jnp.float64:
        scale = q.shape[-1] ** -0.5
        logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=logits_dtype) * scale
        logits = jnp.where(mask, logits, MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1)
        if dropout:
            probs = dropout_module(probs, deterministic=False)
        return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=config.attention_implementation)


class Attention(nn.Module):
    """BART attention with biased q/k/v/out projections; parameters named as in fairseq/Hugging Face."""

    config: BartConfig
    num_heads: int

    def setup(self):
        cfg = self.config
        head_dim = cfg.d_model // self.num_heads

        def qkv(name):
            return nn.DenseGeneral(
                features=(self.num_heads, head_dim), axis=-1, use_bias=True,
                dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                kernel_init=dense_kernel_init(cfg, ("embed", "heads", "kv")),
                bias_init=zeros_init(("heads", "kv")), name=name)

        self.q_proj = qkv("q_proj")
        self.k_proj = qkv("k_proj")
        self.v_proj = qkv("v_proj")
        self.out_proj = nn.DenseGeneral(
            features=cfg.d_model, axis=(-2, -1), use_bias=True,
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            kernel_init=dense_kernel_init(cfg, ("heads", "kv", "embed")),
            bias_init=zeros_init(("embed",)), name="out_proj")
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)

    def project_q(self, x):
        """x [B, T, d] -> q [B, T, N, H]."""
        return nn.with_logical_constraint(self.q_proj(x), ("act_batch", "act_length", "act_heads", "act_kv"))

    def project_kv(self, x):
        """x [B, S, d] -> (k, v), each [B, S, N, H]."""
        names = ("act_batch", "act_length", "act_heads", "act_kv")
        return (nn.with_logical_constraint(self.k_proj(x), names),
                nn.with_logical_constraint(self.v_proj(x), names))

    def attend(self, q, k, v, mask, deterministic: bool):
        """Attention of projected q [B, T, N, H] over k, v [B, S, N, H], then the output projection -> [B, T, d]."""
        out = dot_product_attention(q, k, v, mask, self.config, deterministic, self.attn_dropout)
        return self.out_proj(out)

    def __call__(self, x, kv_input, mask, deterministic: bool):
        """Full attention: queries from x [B, T, d], keys/values from kv_input [B, S, d]; mask bool [B|1, 1, T|1, S]."""
        k, v = self.project_kv(kv_input)
        return self.attend(self.project_q(x), k, v, mask, deterministic)
