"""A randomly initialised model's output bias: the log unigram frequencies of the training targets.

`final_logits_bias` is a frozen buffer (Hugging Face registers it as one; fairseq has none), so from a
zero start the tied embeddings alone must learn how common each token is, and a small model spends its
first hundreds of steps as a unigram model that ignores the encoder. Starting the bias at the targets'
log frequencies hands it that prior for free, and the model learns to copy from its input early; see
bench/RESULTS.md "Main-job recipe" for the measurement. `logits_bias_init: zeros` keeps the reference
initialisation.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def target_log_prior(batches: Iterable[Mapping[str, np.ndarray]], vocab_size: int, pad_id: int,
                     max_batches: int) -> np.ndarray:
    """log p(token) of the targets in the first `max_batches` batches, add-one smoothed: float32 [vocab_size].

    A batch's targets are its 'labels' (fine-tuning; negative or pad entries are ignored) or, for
    pretraining, its clean 'tokens' rows (the denoiser reconstructs them).
    """
    return smoothed_log_prior(target_counts(batches, vocab_size, pad_id, max_batches))


def target_counts(batches: Iterable[Mapping[str, np.ndarray]], vocab_size: int, pad_id: int,
                  max_batches: int) -> np.ndarray:
    """How often each token is a target in the first `max_batches` batches: int64 [vocab_size] (see
    `target_log_prior`; counts of several readers add up)."""
    counts = np.zeros(vocab_size, np.int64)
    for batch in itertools.islice(batches, max_batches):
        targets = np.asarray(batch["labels"] if "labels" in batch else batch["tokens"])
        targets = targets[(targets != pad_id) & (targets >= 0) & (targets < vocab_size)]
        np.add.at(counts, targets, 1)
    return counts


def smoothed_log_prior(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed log frequencies of token `counts`: float32 [vocab_size]."""
    counts = counts.astype(np.float64) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def with_logits_bias(state, log_prior: np.ndarray, sharding):
    """The train state with `final_logits_bias` [padded_vocab] set to log_prior [vocab] (0 on the padding)."""
    current = state.params["final_logits_bias"]
    bias = np.zeros(current.shape, current.dtype)
    bias[:log_prior.shape[0]] = log_prior
    params = dict(state.params)
    params["final_logits_bias"] = jax.device_put(bias, sharding)
    return state.replace(params=params)
