"""Multi-head attention for BART: encoder self-attention, causal decoder self-attention and cross-attention.

One module serves all three; what differs is the mask and where keys/values come from. Shapes use
B batch, T query length, S key length, N heads, H head size, d model width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from bart_jax.config import BartConfig

# Masked logits use a large finite negative, never -inf: a fully padded row must give a finite (uniform)
# softmax, not NaN (the Hugging Face Flax port produced NaN there).
MASK_VALUE = -1e9


def dense_kernel_init(config: BartConfig, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


def zeros_init(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


# Key/value layouts of the decoding cache (`BartConfig.decode_layout_for`), named by their axes: 'bnhs'
# ([B, N, H, S]) is what XLA's CPU matmuls read in place (with others it transposed every layer's cache at
# every step); 'bsnh' ([B, S, N, H]) is the layout the projections produce, updated in place with
# dynamic_update_slice.


def to_cache_layout(x, layout: str):
    """Projected keys or values [B, S, N, H] -> the cache layout `layout` ('bnhs' or 'bsnh')."""
    return x.transpose(0, 2, 3, 1) if layout == "bnhs" else x


def cache_shape(batch: int, length: int, heads: int, head_dim: int, layout: str) -> tuple[int, ...]:
    """Shape of one layer's cache leaf for `length` positions in `layout`: [B, N, H, S] or [B, S, N, H]."""
    return (batch, heads, head_dim, length) if layout == "bnhs" else (batch, length, heads, head_dim)


def cache_length_axis(layout: str) -> int:
    """The positions axis of a cache leaf in `layout`, counted from the end (leading layer axes vary)."""
    return -1 if layout == "bnhs" else -3


def write_cache(cache, new, index, layout: str, layer=None):
    """Write one position's keys or values new [B, 1, N, H] at position `index` of `cache` (laid out as
    `layout`; with `layer`, a stacked cache [L, ...] whose row `layer` is written). Returns the cache."""
    new = to_cache_layout(new, layout).astype(cache.dtype)
    start = [0] * new.ndim
    start[cache_length_axis(layout)] = index
    if layer is not None:
        new, start = new[None], [layer, *start]
    return jax.lax.dynamic_update_slice(cache, new, tuple(start))


def explicit_attention(q, k, v, mask, k_layout: str, v_layout: str):
    """Cached-decoding attention: softmax(q k^T / sqrt(H) masked) v written out, the softmax in float32
    (or float64).

    q: [B, T, N, H]; k, v: laid out as `k_layout`/`v_layout` say ('bnhs' or 'bsnh'); mask: bool
    broadcastable to [B, N, T, S] (True = attend). Returns [B, T, N, H]. (Full attention:
    `dot_product_attention`.)
    """
    scale = q.shape[-1] ** -0.5
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum(f"btnh,{k_layout}->bnts", q, k, preferred_element_type=logits_dtype) * scale
    logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum(f"bnts,{v_layout}->btnh", probs.astype(v.dtype), v)


def attention_bias(mask, dtype):
    """bool mask (True = attend) -> additive logits bias of the same shape: 0 where attended, MASK_VALUE elsewhere.

    Added to the logits instead of a `where` over them: the bias stays at the mask's own (broadcast) shape,
    and the add fuses into the softmax."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(dtype)


def head_major_attention(q, k, v, mask, dropout_module=None):
    """softmax(q k^T / sqrt(H) + bias(mask)) v with heads moved next to batch before the two products.

    q: [B, T, N, H]; k, v: [B, S, N, H]; mask: bool broadcastable to [B, N, T, S] (True = attend).
    Returns [B, T, N, H]; the logits are scaled after the product, as the reference does, and the softmax
    is in float32 (or float64). On XLA's CPU backend the [B, N, T, H]
    operands make plain batched matmuls, where the [B, T, N, H] form went through transposing copies.
    """
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = q.shape[-1] ** -0.5
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=logits_dtype) * scale
    probs = jax.nn.softmax(logits + attention_bias(mask, logits_dtype), axis=-1)
    if dropout_module is not None:
        probs = dropout_module(probs, deterministic=False)
    return jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v).transpose(0, 2, 1, 3)


def dot_product_attention(q, k, v, mask, config: BartConfig, deterministic: bool, dropout_module=None):
    """softmax(q k^T / sqrt(H) masked) v over full (not cached) keys and values.

    q: [B, T, N, H]; k, v: [B, S, N, H]; mask: bool broadcastable to [B, N, T, S] (True = attend).
    Returns [B, T, N, H]. `config.attention_implementation_for(platform)` picks the path for the platform
    the program is lowered for: "explicit" writes it out (`head_major_attention`, with attention dropout when
    active); "auto", "xla" or "cudnn" go through `jax.nn.dot_product_attention` (cuDNN's fused kernel on
    GPU), which has no attention dropout and takes its softmax in float32, so dropout and float64
    (exactness checks) always take the explicit path.
    """
    dropout = config.attention_dropout > 0.0 and not deterministic
    if dropout or q.dtype == jnp.float64:
        return head_major_attention(q, k, v, mask, dropout_module=dropout_module if dropout else None)

    def path(implementation: str):
        if implementation == "explicit":
            return head_major_attention
        return functools.partial(_library_attention,
                                 implementation=None if implementation == "auto" else implementation)

    if config.attention_implementation is not None:  # the same path on every platform
        return path(config.attention_implementation)(q, k, v, mask)
    # Chosen when the program is lowered, for the platform it is lowered for (not the one traced on).
    return jax.lax.platform_dependent(q, k, v, mask, cpu=path(config.attention_implementation_for("cpu")),
                                      default=path(config.attention_implementation_for("default")))


def _library_attention(q, k, v, mask, implementation: str | None):
    """`jax.nn.dot_product_attention` over q [B, T, N, H], k, v [B, S, N, H] -> [B, T, N, H]."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Projection(nn.Module):
    """A biased linear map whose kernel is created at its full shape (contracted axes first).

    (flax's DenseGeneral initialises a flat 2-D kernel and re-boxes it, which breaks logical-axis
    sharding constraints under a mesh.) Parameters: 'kernel' `kernel_shape`, 'bias' `bias_shape`.
    """

    config: BartConfig
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_shape: tuple[int, ...]
    bias_axes: tuple[str, ...]

    def setup(self):
        cfg = self.config
        self.kernel = self.param("kernel", dense_kernel_init(cfg, self.kernel_axes), self.kernel_shape,
                                 cfg.params_dtype)
        self.bias = self.param("bias", zeros_init(self.bias_axes), self.bias_shape, cfg.params_dtype)

    def weights(self):
        """(kernel `kernel_shape`, bias `bias_shape`) cast to the compute dtype."""
        dtype = self.config.compute_dtype
        return self.kernel.astype(dtype), self.bias.astype(dtype)

    def __call__(self, x):
        """x [..., *kernel_shape[:n_in]] -> [..., *bias_shape]."""
        kernel, bias = self.weights()
        # As one 2-D matmul over the flattened contracted axes (the layout torch's Linear uses).
        n_in = len(self.kernel_shape) - len(self.bias_shape)
        flat_in = x.reshape(*x.shape[: x.ndim - n_in], -1).astype(kernel.dtype)
        flat_kernel = kernel.reshape(int(np.prod(self.kernel_shape[:n_in])), -1)
        y = (flat_in @ flat_kernel).reshape(*flat_in.shape[:-1], *self.bias_shape)
        return y + bias


class Attention(nn.Module):
    """BART attention with biased q/k/v/out projections; parameters named as in fairseq/Hugging Face."""

    config: BartConfig
    num_heads: int

    def setup(self):
        cfg = self.config
        d, heads = cfg.d_model, self.num_heads
        head_dim = d // heads

        def in_proj(name):
            return Projection(cfg, (d, heads, head_dim), ("embed", "heads", "kv"),
                              (heads, head_dim), ("heads", "kv"), name=name)

        self.q_proj = in_proj("q_proj")
        self.k_proj = in_proj("k_proj")
        self.v_proj = in_proj("v_proj")
        self.out_proj = Projection(cfg, (heads, head_dim, d), ("heads", "kv", "embed"),
                                   (d,), ("embed",), name="out_proj")
        self.attn_dropout = nn.Dropout(cfg.attention_dropout)

    def project(self, x, which: str):
        """x [B, T, d] -> one [B, T, N, H] per letter of `which` ('qkv', 'kv' or 'q': those projections).

        One matmul against the kernels stacked as [d, N, P, H] (P = len(which)), so the backward's gradient
        w.r.t. x is one contraction: tensor parallelism (heads split) all-reduces it once, where separate
        projections gave one partial sum each, all-reduced before they were added (XLA:CPU does not merge them).
        """
        kernels, biases = zip(*(getattr(self, f"{name}_proj").weights() for name in which))
        # Stacked after the heads: flattened to [d, N*P*H], a split over heads stays contiguous columns.
        kernel = jnp.stack(kernels, axis=2)  # [d, N, P, H]
        flat = x.reshape(-1, x.shape[-1]).astype(kernel.dtype) @ kernel.reshape(kernel.shape[0], -1)
        y = flat.reshape(*x.shape[:-1], *kernel.shape[1:])  # [B, T, N, P, H]
        names = ("act_batch", "act_length", "act_heads", "act_kv")
        # Split, not indexed: the split's transpose concatenates the cotangents, indexing's pads and adds them.
        # Biases added after the split: their gradients reduce each cotangent, not a second concatenated copy.
        return tuple(nn.with_logical_constraint(part.squeeze(-2) + bias, names)
                     for part, bias in zip(jnp.split(y, len(which), axis=-2), biases))

    def attend(self, q, k, v, mask, deterministic: bool):
        """Attention of projected q [B, T, N, H] over k, v [B, S, N, H], then the output projection -> [B, T, d]."""
        return self.out_proj(dot_product_attention(q, k, v, mask, self.config, deterministic, self.attn_dropout))

    def attend_cached(self, q, k, v, mask, layout: str):
        """Decoding attention of q [B, T, N, H] over cached k, v laid out as `layout` ([B, N, H, S] or
        [B, S, N, H]), then the output projection -> [B, T, d]."""
        return self.out_proj(explicit_attention(q, k, v, mask, layout, layout))

    def __call__(self, x, kv_input, mask, deterministic: bool):
        """Full attention: queries from x [B, T, d], keys/values from kv_input [B, S, d] (None: from x,
        self-attention); mask bool [B|1, 1, T|1, S]."""
        if kv_input is None:
            q, k, v = self.project(x, "qkv")
        else:
            (q,), (k, v) = self.project(x, "q"), self.project(kv_input, "kv")
        return self.attend(q, k, v, mask, deterministic)
