"""Batched building blocks of the noise kernels: every array is [B, N] (one row per example).

They are written for XLA on CPU as much as for accelerators: gathers and scatters index the flattened
batch (no per-row index arrays), cumulative sums are two small matmuls, random orders are
single-operand sorts of packed keys (of candidates only, when only the first ranks matter), small
random subsets come from Floyd's algorithm, and random bits come from a keyed counter hash.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BLOCK = 32  # block width of the two-level cumulative sum


def rows(x):
    """Row index column [B, 1] for an array with leading axis B."""
    return jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]


def take(x, idx):
    """x[b, idx[b, m]] for x [B, N] and idx [B, M] (clamped into [0, N))."""
    B, N = x.shape
    flat = (rows(x) * N + jnp.clip(idx, 0, N - 1)).reshape(-1)
    return x.reshape(-1).at[flat].get(mode="promise_in_bounds").reshape(idx.shape)


def take_columns(table, idx):
    """table[b, idx[b, m], :] for table [B, N, C] and idx [B, M] (clamped): one gather for C columns."""
    B, N, C = table.shape
    flat = (rows(idx) * N + jnp.clip(idx, 0, N - 1)).reshape(-1)
    return table.reshape(B * N, C).at[flat].get(mode="promise_in_bounds").reshape(idx.shape + (C,))


def put(width: int, idx, values, fill, dtype=jnp.int32):
    """[B, width] array of `fill` with out[b, idx[b, m]] = values[b, m]; idx outside [0, width) is
    dropped. Indices that are kept must be unique (duplicate writes land in no set order)."""
    B = idx.shape[0]
    values = jnp.broadcast_to(jnp.asarray(values, dtype), idx.shape)
    flat = jnp.where((idx >= 0) & (idx < width), rows(idx) * width + idx, B * width).reshape(-1)
    out = jnp.full(B * width, fill, dtype).at[flat].set(values.reshape(-1), mode="drop")
    return out.reshape(B, width)


def put_columns(width: int, idx, values, fill):
    """As `put` for rows of C values: values [B, M, C] -> [B, width, C] (one scatter)."""
    B, M, C = values.shape
    flat = jnp.where((idx >= 0) & (idx < width), rows(idx) * width + idx, B * width).reshape(-1)
    out = jnp.full((B * width, C), fill, values.dtype).at[flat].set(values.reshape(B * M, C), mode="drop")
    return out.reshape(B, width, C)


def put_add_columns(width: int, idx, values):
    """As `put_add` for rows of C values: values [B, M, C] -> [B, width, C] (one scatter)."""
    B, M, C = values.shape
    flat = jnp.where((idx >= 0) & (idx < width), rows(idx) * width + idx, B * width).reshape(-1)
    out = jnp.zeros((B * width, C), values.dtype).at[flat].add(values.reshape(B * M, C), mode="drop")
    return out.reshape(B, width, C)


def put_add(width: int, idx, values, dtype=jnp.int32):
    """As `put`, adding `values` into zeros (duplicates accumulate)."""
    B = idx.shape[0]
    values = jnp.broadcast_to(jnp.asarray(values, dtype), idx.shape)
    flat = jnp.where((idx >= 0) & (idx < width), rows(idx) * width + idx, B * width).reshape(-1)
    return jnp.zeros(B * width, dtype).at[flat].add(values.reshape(-1), mode="drop").reshape(B, width)


def cumsum(x):
    """Inclusive cumulative sum over the last axis of an integer or bool array, as int32.

    Two-level blocked sum as float32 matmuls (several times faster than XLA's scan on CPU); exact
    because every partial sum here is an integer below 2**24, and HIGHEST precision keeps it exact on
    GPU/TPU (no TF32/bf16 passes).
    """
    n = x.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    if n <= 4 * _BLOCK:  # short rows: one matmul with the triangle
        tri = jnp.triu(jnp.ones((n, n), jnp.float32))
        return jnp.round(jnp.matmul(x.astype(jnp.float32), tri, precision=hi)).astype(jnp.int32)
    nb = -(-n // _BLOCK)
    xf = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, nb * _BLOCK - n)])
    xb = xf.reshape(x.shape[:-1] + (nb, _BLOCK))
    within = jnp.matmul(xb, jnp.triu(jnp.ones((_BLOCK, _BLOCK), jnp.float32)), precision=hi)
    before = jnp.matmul(within[..., -1], jnp.triu(jnp.ones((nb, nb), jnp.float32), 1), precision=hi)
    out = (within + before[..., None]).reshape(x.shape[:-1] + (nb * _BLOCK,))[..., :n]
    return jnp.round(out).astype(jnp.int32)


def ceil_ratio(count, ratio: float):
    """ceil(count x ratio) in float32 (fairseq computes its span budget on float32 tensors)."""
    return jnp.ceil(jnp.asarray(count).astype(jnp.float32) * jnp.float32(ratio)).astype(jnp.int32)


def shift(x, d: int):
    """x moved d slots right along the last axis (x[..., v - d] at v), zero-filled."""
    if d == 0:
        return x
    return jnp.pad(x[..., :x.shape[-1] - d], [(0, 0)] * (x.ndim - 1) + [(d, 0)])


# ------------------------------------------------------------------------------- random orders


def prefix(count, width: int):
    """bool [B, width]: slot < count[b] (the valid slots of a count)."""
    return jnp.arange(width)[None, :] < count[:, None]


def sort_keys(priority, valid, index_bits: int):
    """Single-operand sort keys: priority high bits | slot index; invalid slots sort last.

    priority: uint32 [B, n]; valid: bool [B, n]. Ties in the high bits break toward the lower slot.
    """
    low = (1 << index_bits) - 1
    high = jnp.uint32(0xFFFFFFFF ^ low)
    idx = jnp.arange(priority.shape[-1], dtype=jnp.uint32)[None, :]
    return jnp.where(valid, priority & high, high) | idx


def random_order(priority, valid, index_bits: int):
    """fairseq's randperm over the valid slots, per row: order int32 [B, n], order[b, r] = slot of
    rank r (invalid slots come last, in index order)."""
    return (jnp.sort(sort_keys(priority, valid, index_bits), axis=-1)
            & jnp.uint32((1 << index_bits) - 1)).astype(jnp.int32)


def candidate_count(k):
    """How many smallest priorities to keep (on average) as candidates for the k smallest: about
    4.5 standard deviations more than k, so fewer than k survive with probability < 1e-5."""
    return k + 5.0 * jnp.sqrt(k) + 10.0


def smallest_order(priority, valid, count, k, cap: int, index_bits: int, payload=None):
    """`random_order` restricted to its first k entries, sorting only the candidates whose priority
    falls under a threshold expected to keep `candidate_count(k)` of them. Candidates keep the full
    order's comparison (same high bits, ties by slot), so the result is the full order's prefix.

    priority: uint32 [B, n]; valid: bool [B, n] (count [B] of them); k: int [B]; payload: optional
    int32 [B, n] carried along. Returns (order int32 [B, cap]: slots, exact for ranks < k; the payload
    in rank order or None; ok bool [B]: False where the candidates missed one of the k smallest or
    overflowed `cap`, in which case the caller must use `random_order`).
    """
    keys = sort_keys(priority, valid, index_bits)
    high = jnp.uint32(0xFFFFFFFF ^ ((1 << index_bits) - 1))
    fraction = candidate_count(k.astype(jnp.float32)) / jnp.maximum(count, 1).astype(jnp.float32)
    threshold = jnp.floor(jnp.minimum(fraction, 1.0) * 4294967040.0).astype(jnp.uint32) & high
    # Whole priority classes (same high bits) are in or out, so candidates are a prefix of the order.
    candidate = valid & (((keys & high) < threshold[:, None]) | (fraction >= 1.0)[:, None])
    slot = cumsum(candidate) - 1
    num_candidates = slot[:, -1] + 1
    buffer = put(cap, jnp.where(candidate, slot, cap), keys, 0xFFFFFFFF, jnp.uint32)
    order = (jnp.sort(buffer, axis=-1) & jnp.uint32((1 << index_bits) - 1)).astype(jnp.int32)
    carried = take(payload, order) if payload is not None else None
    return order, carried, (num_candidates >= k) & (num_candidates <= cap)


def floyd(u, population, k):
    """Floyd's algorithm per row: a uniformly random k-subset of range(population).

    u: float32 [B, Z] uniforms (draw i is used at step i); population, k: int [B] with k <= Z.
    Returns int32 [B, Z]: entry i < k is the i-th pick, the rest -1. A loop of max(k) steps (a handful
    here) of O(Z) work each.
    """
    B, Z = u.shape

    def step(i, picks):
        j = population - k + i
        t = jnp.minimum(jnp.floor(u[:, i] * (j + 1).astype(jnp.float32)).astype(jnp.int32), j)
        pick = jnp.where(jnp.any(picks == t[:, None], axis=-1), j, t)
        return picks.at[:, i].set(jnp.where(i < k, pick, -1))

    return jax.lax.fori_loop(0, jnp.max(k, initial=0), step, jnp.full((B, Z), -1, jnp.int32))


# --------------------------------------------------------------------------------- random bits


def mix32(x):
    """A bijective 32-bit mixer with low avalanche bias (C. Wellons' 'lowbias32')."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_words(words, k0, k1):
    """Keyed hash of uint32 words: mix32 of a per-key affine map (odd multiplier), so it is
    bijective in the words and different keys give unrelated sequences."""
    return mix32(words * (k1 | jnp.uint32(1)) + k0)


def stream_bits(seeds, stream: int, n: int):
    """uint32 [B, n]: words 0..n-1 of stream `stream` (< 256) for rows seeded by seeds uint32 [B, 2].

    A keyed counter hash (bijective in the counter), so a stream's prefix does not depend on n.
    """
    counter = jnp.arange(n, dtype=jnp.uint32)[None, :] + jnp.uint32(stream << 24)
    return hash_words(counter, seeds[:, :1], seeds[:, 1:])


def uniform(bits):
    """float32 in [0, 1) from uint32 bits (24 bits of resolution)."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def mul_high(a, b: int):
    """floor(a x b / 2**32) for uint32 a and a Python int 0 <= b < 2**32, in 32-bit arithmetic."""
    a0, a1 = a & jnp.uint32(0xFFFF), a >> 16
    b0, b1 = jnp.uint32(b & 0xFFFF), jnp.uint32(b >> 16)
    lo_lo, lo_hi, hi_lo = a0 * b0, a0 * b1, a1 * b0
    middle = (lo_lo >> 16) + (lo_hi & jnp.uint32(0xFFFF)) + (hi_lo & jnp.uint32(0xFFFF))
    return a1 * b1 + (lo_hi >> 16) + (hi_lo >> 16) + (middle >> 16)


def random_tokens(bits, vocab_size: int, excluded: tuple[int, ...]):
    """Uniform ids in [0, vocab_size) minus the sorted, distinct `excluded` ids (each id's chance is
    exact to within 2**-32 x vocab_size)."""
    tok = mul_high(bits, vocab_size - len(excluded)).astype(jnp.int32)
    for e in excluded:  # skip over each excluded id, smallest first
        tok = tok + (tok >= e).astype(jnp.int32)
    return tok
