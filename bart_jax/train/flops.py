"""Model FLOPs of a BART train step and the measured matmul peak, for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig


def forward_flops(config: BartConfig, batch: int, source_length: int, target_length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over padded [batch, S] -> [batch, T].

    Counts every projection, the feed-forward layers, attention scores and mixing (full, not halved
    for the causal mask, as is conventional) and the tied LM head over the logical vocabulary.
    """
    d, S, T = config.d_model, source_length, target_length
    enc_layer = 2 * (4 * d * d + 2 * d * config.encoder_ffn_dim) * S + 2 * 2 * S * S * d
    dec_layer = (2 * (4 * d * d + 2 * d * d + 2 * d * config.decoder_ffn_dim) * T  # self qkvo, cross q/o, ffn
                 + 2 * 2 * d * d * S  # cross-attention keys/values over the encoder output
                 + 2 * 2 * T * T * d + 2 * 2 * T * S * d)  # self and cross attention scores + mixing
    head = 2 * d * config.vocab_size * T
    return float(batch) * (config.encoder_layers * enc_layer + config.decoder_layers * dec_layer + head)


def train_step_flops(config: BartConfig, batch: int, source_length: int, target_length: int) -> float:
    """Model FLOPs of a training step: forward + backward = 3 x forward (rematerialisation not counted)."""
    return 3.0 * forward_flops(config, batch, source_length, target_length)


def measure_matmul_flops(dtype=jnp.float32, size: int = 1024, seconds: float = 0.5,
                         device: jax.Device | None = None) -> float:
    """Sustained FLOP/s of a square `size` matmul in `dtype` on one device (best of repeated timings)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < 3:
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2.0 * size ** 3 / best
