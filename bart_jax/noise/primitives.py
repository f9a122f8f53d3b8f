"""Batched building blocks of the noise stages: every array is [B, N] (one row per example)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _in_range(idx, width: int):
    """idx where it lies in [0, width), else width (an index that scatters with mode='drop' discard)."""
    return jnp.where((idx >= 0) & (idx < width), idx, width)


def take(x, idx):
    """x[b, idx[b, m]] for x [B, N] and idx [B, M] (indices clamped into [0, N))."""
    return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)


def put(width: int, idx, values, fill, dtype=jnp.int32):
    """[B, width] array of `fill` with out[b, idx[b, m]] = values[b, m]; idx outside [0, width) is
    dropped. Indices that are kept must be unique (duplicate writes land in no set order)."""
    values = jnp.broadcast_to(jnp.asarray(values, dtype), idx.shape)
    rows = jnp.arange(idx.shape[0])[:, None]
    return jnp.full((idx.shape[0], width), fill, dtype).at[rows, _in_range(idx, width)].set(values, mode="drop")


def put_add(width: int, idx, values, dtype=jnp.int32):
    """As `put`, adding `values` into zeros (duplicates accumulate)."""
    values = jnp.broadcast_to(jnp.asarray(values, dtype), idx.shape)
    rows = jnp.arange(idx.shape[0])[:, None]
    return jnp.zeros((idx.shape[0], width), dtype).at[rows, _in_range(idx, width)].add(values, mode="drop")


def cumsum(x):
    """Inclusive cumulative sum over the last axis, int32."""
    return jnp.cumsum(x.astype(jnp.int32), axis=-1, dtype=jnp.int32)


def ceil_ratio(count, ratio: float):
    """ceil(count x ratio) in float32 (fairseq computes its span budget on float32 tensors)."""
    return jnp.ceil(jnp.asarray(count).astype(jnp.float32) * jnp.float32(ratio)).astype(jnp.int32)


def shift(x, d: int):
    """x moved d slots right along the last axis (x[..., v - d] at v), zero-filled."""
    if d == 0:
        return x
    return jnp.pad(x[..., :x.shape[-1] - d], [(0, 0)] * (x.ndim - 1) + [(d, 0)])


def prefix(count, width: int):
    """bool [B, width]: slot < count[b] (the valid slots of a count)."""
    return jnp.arange(width)[None, :] < count[:, None]


def random_order(priority, valid):
    """fairseq's randperm over each row's valid slots: int32 [B, n], entry r = the slot of rank r.

    priority: uint32 [B, n] random bits; valid: bool [B, n]. Valid slots come first, by increasing
    priority (ties, of probability 2**-32 per pair, toward the lower slot); invalid slots follow in
    index order.
    """
    slot = jnp.broadcast_to(jnp.arange(priority.shape[-1], dtype=jnp.int32), priority.shape)
    invalid = (~valid).astype(jnp.uint32)
    return jax.lax.sort((invalid, jnp.where(valid, priority, 0), slot), dimension=-1, num_keys=3)[2]
