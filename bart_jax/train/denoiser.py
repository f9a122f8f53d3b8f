"""How good is a pretrained model as a denoiser? Token accuracy of teacher-forced reconstruction on held-out
text from (a) the clean text itself and (b) the pretraining noise, next to what copying the noised input
would score, and one beam-search reconstruction to read.

A pretrained BART that cannot rebuild clean text (a) has not learned to copy, the first thing a denoising
autoencoder learns; (b) far above the copy baseline means it has learned to fill in what the noise removed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.config import BartConfig


@dataclasses.dataclass(frozen=True)
class DenoiserReport:
    """Token accuracies (fractions of non-pad target tokens) on `tokens` target tokens.

    clean_accuracy: reconstruction from the clean text. noised_accuracy: from the noised text.
    copy_accuracy: a model that outputs the noised input unchanged (position by position).
    example: {'clean', 'noised', 'reconstruction'} texts of the first evaluated row (beam search).
    """

    clean_accuracy: float
    noised_accuracy: float
    copy_accuracy: float
    tokens: int
    example: dict[str, str]


def make_accuracy_step(model_config: BartConfig, noise_fn: Callable):
    """step(params, tokens [B, L], index) -> (int32 [4]: clean correct, noised correct, copy correct, targets;
    the noised input the counts were taken on: 'input_ids' and 'attention_mask' int32 [B, S])."""
    from bart_jax.train.step import make_eval_step

    eval_step = make_eval_step(model_config, label_smoothing=0.0)  # counts argmax hits on real target tokens
    pad = model_config.pad_token_id

    def step(params, tokens, index):
        noised = noise_fn({"tokens": tokens}, index)
        clean_mask = (noised["labels"] != pad).astype(jnp.int32)
        clean = {**noised, "input_ids": noised["labels"], "attention_mask": clean_mask}
        from_clean, from_noised = eval_step(params, clean, index), eval_step(params, noised, index)
        labels, source = noised["labels"], noised["input_ids"]
        width = min(labels.shape[1], source.shape[1])
        copy_hit = (source[:, :width] == labels[:, :width]) & (labels[:, :width] != pad)
        counts = jnp.stack([from_clean["correct"].astype(jnp.int32), from_noised["correct"].astype(jnp.int32),
                            jnp.sum(copy_hit, dtype=jnp.int32), from_noised["tokens"]])
        return counts, noised["input_ids"], noised["attention_mask"]

    return jax.jit(step)


def measure_denoiser(model_config: BartConfig, params, tokenizer, batches: Iterator[dict], noise_fn: Callable,
                     num_batches: int, *, num_beams: int = 4) -> DenoiserReport:
    """Accuracies over `num_batches` batches of clean rows {'tokens': int32 [B, L]} noised by
    `noise_fn(batch, index)` (the pretraining eval noise), plus a beam reconstruction of the first measured
    row (noised as it was measured)."""
    from bart_jax.decode.generate import generate, strip_special

    step = make_accuracy_step(model_config, noise_fn)
    totals = np.zeros(4, np.int64)
    example = None
    for i in range(num_batches):
        try:
            tokens = np.asarray(next(batches)["tokens"])
        except StopIteration:
            break
        counts, noised_ids, noised_mask = step(params, tokens, jnp.int32(i))
        totals += np.asarray(counts)
        if example is None:
            out = generate(model_config, params, noised_ids[:1], noised_mask[:1],
                           num_beams=num_beams, max_length=tokens.shape[1], early_stopping=True)
            example = {
                "clean": tokenizer.decode(strip_special([0, *tokens[0]], model_config)),
                "noised": tokenizer.decode(strip_special([0, *np.asarray(noised_ids[0])], model_config),
                                           skip_special_tokens=False),
                "reconstruction": tokenizer.decode(strip_special(np.asarray(out.sequences[0, 0]), model_config)),
            }
    n = max(int(totals[3]), 1)
    return DenoiserReport(clean_accuracy=totals[0] / n, noised_accuracy=totals[1] / n, copy_accuracy=totals[2] / n,
                          tokens=int(totals[3]), example=example or {})
