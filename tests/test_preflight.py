"""The memory check before any work: a lower bound per device that counts the gradient as the step holds it."""

import pytest

from bart_jax.errors import UserError
from bart_jax.train import preflight
from bart_jax.train.config import load_config

GB = 1e9


def check(monkeypatch, available_gb, *overrides):
    cfg = load_config("large", ["pretrain.train.batch_size=64", "pretrain.train.micro_batches=8", *overrides])
    monkeypatch.setattr(preflight, "_device_memory_bytes", lambda: available_gb * GB)
    preflight._check_memory(cfg, "pretrain", cfg.model.bart_config(), (1, 8, 1))


def test_the_whole_gradient_per_device_counts_and_per_micro_batch_is_suggested(monkeypatch):
    # bart-large on fsdp 8: weights and moments 12 B/param split 8 ways (~0.6 GB), the fp32 gradient whole on
    # each device with per_step (~1.6 GB), split with per_micro_batch (~0.2 GB), logits ~0.2 GB.
    with pytest.raises(UserError, match=r"pretrain.train.gradient_reduction=per_micro_batch"):
        check(monkeypatch, 1.5)
    check(monkeypatch, 1.5, "pretrain.train.gradient_reduction=per_micro_batch")
    check(monkeypatch, 3.0)
    with pytest.raises(UserError) as e:
        check(monkeypatch, 0.5, "pretrain.train.gradient_reduction=per_micro_batch")
    assert "gradient_reduction" not in str(e.value)


def test_an_unknown_gradient_reduction_is_refused():
    with pytest.raises(ValueError, match=r"pretrain.train.gradient_reduction='per_layer'"):
        load_config("large", ["pretrain.train.gradient_reduction=per_layer"])
