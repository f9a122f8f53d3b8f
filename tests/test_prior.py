"""A random init's output bias starts at the log unigram frequencies of the training targets (frozen)."""

from __future__ import annotations

import numpy as np
import pytest

from bart_jax.train import config as C
from bart_jax.train import inputs, loop
from bart_jax.train.prior import target_log_prior
from toy_batches import SMALL_MODEL_OVERRIDES


def test_target_log_prior_counts_targets_add_one_smoothed():
    pad = 1
    batches = [{"tokens": np.array([[0, 5, 5, 2, pad], [0, 6, 2, pad, pad]])},
               {"input_ids": np.array([[7, 7, 7]]), "labels": np.array([[5, 2, -100]])},
               {"tokens": np.array([[9, 9, 9]])}]  # beyond max_batches: not read
    prior = target_log_prior(iter(batches), vocab_size=10, pad_id=pad, max_batches=2)
    counts = np.ones(10)
    for token, n in {0: 2, 5: 3, 2: 3, 6: 1}.items():
        counts[token] += n
    np.testing.assert_allclose(prior, np.log(counts / counts.sum()), rtol=1e-6)
    assert prior.dtype == np.float32 and prior.shape == (10,)


def _config(tmp_path, bias_init: str):
    from bart_jax.data import datasets

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the quick fox number {i} jumps over the lazy dog. the end." for i in range(100)),
                    encoding="utf-8")
    source = datasets.prepare_text_corpus({"train": [text]}, tmp_path / "data", name="c", overwrite=True).path
    return C.load_config("tiny", [
        f"workdir={tmp_path / bias_init}", f"data.pretrain_source={source}", "data.tokenizer_vocab_size=300",
        *SMALL_MODEL_OVERRIDES, "model.encoder_attention_heads=2", "model.decoder_attention_heads=2",
        "pretrain.train.steps=2", "pretrain.train.batch_size=8",
        "pretrain.train.source_length=32", "pretrain.train.eval_every=0", "pretrain.train.checkpoint_every=2",
        "pretrain.train.progress_bar=false", "pretrain.train.peak_flops_per_device=1e9",
        "checkpoint.async_save=false", f"pretrain.logits_bias_init={bias_init}"])


@pytest.mark.integration
def test_pretraining_from_scratch_starts_the_output_bias_at_the_target_prior(tmp_path):
    from bart_jax.convert import from_pretrained

    cfg = _config(tmp_path, "target_prior")
    _, params = from_pretrained(loop.pretrain(cfg).model_dir)
    bias = np.asarray(params["final_logits_bias"])
    tok, _ = inputs.load_or_train_tokenizer(cfg)
    # Frozen: after training it is still exactly a log-distribution over the vocabulary.
    vocab = 512  # model.vocab_size; the bias beyond it (padding to a multiple) is not a logit
    assert abs(np.exp(bias[:vocab].astype(np.float64)).sum() - 1.0) < 1e-3
    the = tok.encode("the")[-1]
    assert bias[the] > np.log(1 / 50) > np.median(bias[:vocab])  # a frequent piece vs the typical one
    assert np.all(bias[vocab:] == 0)


def test_zeros_starts_the_output_bias_at_zero(tmp_path):
    # The initial state is what differs (the bias is frozen either way: test_train_step's
    # test_final_logits_bias_is_frozen), so no training step is needed.
    from bart_jax.train.setup import setup_stage

    setup = setup_stage(_config(tmp_path, "zeros"), "pretrain")
    try:
        assert np.all(np.asarray(setup.state.params["final_logits_bias"]) == 0)
    finally:
        setup.ckpt.close()


def test_unknown_logits_bias_init_is_a_one_line_config_error():
    with pytest.raises(ValueError, match="pretrain.logits_bias_init.*target_prior"):
        C.load_config("tiny", ["pretrain.logits_bias_init=unigram"])
