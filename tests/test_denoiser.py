"""The denoiser measurement: accuracies from clean and noised input, and the copy baseline."""

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax import noise
from bart_jax.config import preset
from bart_jax.model import Bart
from bart_jax.train.denoiser import measure_denoiser


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _rows(rng, batch, length, vocab):
    tokens = np.full((batch, length), 1, np.int32)
    for r in range(batch):
        n = rng.integers(length // 2, length - 2)
        tokens[r, 0], tokens[r, 1:n + 1], tokens[r, n + 1] = 0, rng.integers(5, vocab, n), 2
    return tokens


def _setup(noise_overrides):
    config = preset("tiny", dropout=0.0)
    tokens = _rows(np.random.default_rng(0), 4, 24, config.vocab_size)
    params = Bart(config).init(jax.random.PRNGKey(0), jnp.asarray(tokens), jnp.ones_like(tokens),
                               jnp.asarray(tokens), jnp.ones_like(tokens))["params"]
    cfg = noise.noise_preset("bart_large", mask_id=4, **noise_overrides)
    word_starts = jnp.ones(config.vocab_size, bool)

    def noise_fn(batch, index):
        return noise.denoising_batch(noise.noise_key(0, index), batch["tokens"], word_starts, cfg)

    return config, params, tokens, noise_fn


def test_without_noise_copying_is_perfect_and_both_inputs_score_the_same():
    config, params, tokens, noise_fn = _setup(dict(mask_ratio=0.0, random_ratio=0.0, permute_sentence_ratio=0.0))
    report = measure_denoiser(config, params, _Tok(), iter([{"tokens": tokens}] * 2), noise_fn, 2, num_beams=1)
    assert report.copy_accuracy == 1.0
    assert report.clean_accuracy == report.noised_accuracy
    assert report.tokens == 2 * int(np.sum(tokens != 1))
    assert report.example["clean"] == report.example["noised"]


def test_noise_lowers_the_copy_baseline_and_a_random_model_does_not_reconstruct():
    config, params, tokens, noise_fn = _setup({})
    report = measure_denoiser(config, params, _Tok(), iter([{"tokens": tokens}]), noise_fn, 1, num_beams=2)
    assert 0.0 < report.copy_accuracy < 0.9
    assert report.clean_accuracy < 0.2  # an untrained model
    assert report.example["clean"] != report.example["noised"]
    assert set(report.example) == {"clean", "noised", "reconstruction"}
