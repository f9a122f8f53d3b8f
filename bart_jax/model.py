"""BART encoder-decoder (placeholder while the model lands): shift_tokens_right."""

from __future__ import annotations

import jax.numpy as jnp


def shift_tokens_right(labels, pad_token_id: int, decoder_start_token_id: int):
    """Decoder inputs from targets, BART's convention: `[start, y_0, ..., y_{T-2}]`.

    labels: int [B, T] (may hold -100 for ignored positions, which become pad). Returns int32 [B, T].
    """
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate(
        [jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted).astype(jnp.int32)
