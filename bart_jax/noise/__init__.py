"""BART's denoising noise as pure, jit-compiled JAX (fairseq's DenoisingDataset on fixed-shape batches).

    cfg = noise_preset("bart_large", sentence_end_ids=tokenizer.sentence_end_ids(), mask_id=tokenizer.mask_id)
    batch = denoising_batch(noise_key(seed, step), tokens, word_starts, cfg)
"""

from bart_jax.noise.config import NOISE_PRESETS, NoiseConfig, noise_preset, span_length_pmf
from bart_jax.noise.draws import NoiseDraws, NoiseSizes, noise_sizes, sample_draws
from bart_jax.noise.ops import apply_noise, denoising_batch, noise_key, noise_tokens

__all__ = [
    "NOISE_PRESETS",
    "NoiseConfig",
    "NoiseDraws",
    "NoiseSizes",
    "apply_noise",
    "denoising_batch",
    "noise_key",
    "noise_preset",
    "noise_sizes",
    "noise_tokens",
    "sample_draws",
    "span_length_pmf",
]
