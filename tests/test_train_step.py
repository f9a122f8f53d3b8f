"""The shared train step: gradient accumulation, short/empty batches, the non-finite guard, mixed
precision, and the loop stopping cleanly after K non-finite steps."""

import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax import preset
from bart_jax.model import param_logical_axes, shift_tokens_right
from bart_jax.train import config as C
from bart_jax.train import optim, partitioning
from bart_jax.train.state import abstract_params, create_train_state
from bart_jax.train.step import compile_train_step, make_train_step
from toy_batches import SMALL_MODEL_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = preset("tiny", dropout=0.0, vocab_size=128, max_position_embeddings=32)


def model_batch(seed, batch=8, length=16, empty_rows=0):
    """A model batch with ragged rows (and `empty_rows` all-padding rows at the end)."""
    r = np.random.RandomState(seed)
    ids = r.randint(5, MODEL.vocab_size, size=(batch, length)).astype(np.int32)
    lens = r.randint(3, length + 1, size=batch)
    lens[batch - empty_rows:] = 0
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, MODEL.pad_token_id)
    labels = ids.copy()
    dec = np.asarray(shift_tokens_right(labels, MODEL.pad_token_id, MODEL.decoder_start_token_id))
    src_mask = mask.copy()
    src_mask[:, 0] = 1  # every source row has at least one real token
    return dict(input_ids=ids, attention_mask=src_mask, decoder_input_ids=dec,
                decoder_attention_mask=(dec != MODEL.pad_token_id).astype(np.int32), labels=labels)


_SETUPS = {}


# eps=1 makes Adam's step ~linear in the gradient, so comparing parameters compares gradients too.
OPT = C.OptimizerConfig(name="adamw", learning_rate=1.0, eps=1.0, clip_norm=0.0)


def setup(model=MODEL, micro_batches=1, opt=None):
    """(fresh state, compiled step, batch sharding) on one device; compiled once per configuration."""
    opt_cfg = opt or OPT
    key = (model, micro_batches, opt_cfg)
    if key not in _SETUPS:
        mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
        optimizer, schedule = optim.make_optimizer(opt_cfg, C.ScheduleConfig(decay="constant"), 10,
                                                   abstract_params(model), param_logical_axes(model))
        state, shardings = create_train_state(model, optimizer, mesh, seed=0)
        step = compile_train_step(make_train_step(model, optimizer, schedule, micro_batches=micro_batches,
                                                  label_smoothing=0.1, grad_shardings=shardings.params),
                                  shardings, mesh)
        _SETUPS[key] = (state, step, partitioning.batch_sharding(mesh))
    state, step, sharding = _SETUPS[key]
    return jax.tree.map(jnp.copy, state), step, sharding  # the step donates its input state


def run(state, step, sharding, batches):
    metrics = []
    for b in batches:
        state, m = step(state, jax.device_put(b, sharding))
        metrics.append(jax.device_get(m))
    return state, metrics


def test_gradient_accumulation_equals_full_batch():
    batches = [model_batch(0), model_batch(1, empty_rows=3)]
    ref_state, ref_m = run(*setup(micro_batches=1), batches)
    acc_state, acc_m = run(*setup(micro_batches=4), batches)
    for a, b in zip(ref_m, acc_m):
        # grad_norm pins the gradient scale (Adam's update alone would hide a wrong 1/M factor)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a["tokens"] == b["tokens"]
    chex.assert_trees_all_close(ref_state.params, acc_state.params, rtol=1e-5, atol=1e-7)


def test_short_and_empty_batches_never_nan():
    state, step, sharding = setup()
    before = jax.device_get(state.params)
    state, (m_empty, m_short) = run(state, step, sharding,
                                    [model_batch(2, empty_rows=8), model_batch(3, empty_rows=6)])
    assert m_empty["tokens"] == 0 and m_empty["loss"] == 0.0 and m_empty["skipped"] == 1
    assert m_empty["nonfinite_streak"] == 0  # empty is not divergence
    assert np.isfinite(m_short["loss"]) and m_short["loss"] > 0 and m_short["skipped"] == 0
    assert int(state.step) == 2 and int(state.updates) == 1  # the empty batch was not an update
    # the empty batch changed nothing; the short one did
    after = jax.device_get(state.params)
    assert not np.allclose(before["shared"]["embedding"], after["shared"]["embedding"])


def test_nonfinite_step_is_skipped_and_counted():
    state, step, sharding = setup()
    good = jax.device_get(state.params)
    poisoned = jax.tree.map(np.array, good)
    poisoned["final_logits_bias"][7] = np.nan
    state = state.replace(params=jax.device_put(poisoned, jax.tree.map(lambda x: x.sharding, state.params)))
    opt_before = jax.device_get(state.opt_state)
    state, ms = run(state, step, sharding, [model_batch(4), model_batch(5)])
    assert [int(m["nonfinite_streak"]) for m in ms] == [1, 2]
    assert all(m["skipped"] == 1 and not np.isfinite(m["loss"]) for m in ms)
    chex.assert_trees_all_equal(jax.device_get(state.params), poisoned)  # untouched (NaN == NaN here)
    chex.assert_trees_all_equal(jax.device_get(state.opt_state), opt_before)
    state = state.replace(params=jax.device_put(good, jax.tree.map(lambda x: x.sharding, state.params)))
    state, (m,) = run(state, step, sharding, [model_batch(6)])
    assert m["nonfinite_streak"] == 0 and m["nonfinite_total"] == 2 and m["skipped"] == 0
    assert int(state.step) == 3 and int(state.updates) == 1


def test_step_updates_optimizer_state_in_place():
    """The non-finite guard must not keep the old optimizer state alive beside the new: a `where` over the
    results made XLA copy every Adam moment tensor each step (the whole optimizer state's memory traffic)."""
    state, step, sharding = setup()
    hlo = step.lower(state, jax.device_put(model_batch(0), sharding)).compile().as_text()
    copied = sorted(set(re.findall(r"copy\(%(state_opt_state\w*)", hlo)))
    assert copied == [], f"the step copies {len(copied)} optimizer-state tensors, e.g. {copied[:3]}"


def test_final_logits_bias_is_frozen():
    """A buffer in Hugging Face: never changes, gets no gradient and holds no optimizer state."""
    opt = C.OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.1, clip_norm=1.0)
    state, step, sharding = setup(opt=opt)
    bias = np.random.RandomState(0).normal(size=state.params["final_logits_bias"].shape).astype(np.float32)
    params = {**jax.device_get(state.params), "final_logits_bias": bias}
    state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params)))
    before = jax.device_get(state.params)
    state, ms = run(state, step, sharding, [model_batch(s) for s in (10, 11, 12)])
    after = jax.device_get(state.params)
    assert all(m["skipped"] == 0 for m in ms) and int(state.updates) == 3
    np.testing.assert_array_equal(after["final_logits_bias"], bias)  # bitwise
    fc2 = lambda p: p["decoder"]["layers"]["ffn"]["fc2"]["bias"]  # noqa: E731
    assert not np.allclose(fc2(after), fc2(before))  # other biases do train
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert any("fc2" in p for p in paths)
    assert not [p for p in paths if "final_logits_bias" in p]


def test_bf16_compute_keeps_fp32_master_weights():
    bf16 = MODEL.replace(dtype="bfloat16", param_dtype="float32")
    state, step, sharding = setup(bf16)
    state, (m,) = run(state, step, sharding, [model_batch(7)])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))
    ref_state, ref_step, _ = setup(MODEL)
    _, (m32,) = run(ref_state, ref_step, sharding, [model_batch(7)])
    np.testing.assert_allclose(m["loss"], m32["loss"], rtol=2e-2)  # same init, bf16 matmuls


@pytest.mark.integration  # a whole CLI stage; the guard itself: test_guard.py
def test_training_stops_after_k_nonfinite_steps(tmp_path, capsys):
    """A step that blows the weights up gives NaN afterwards; after K in a row the CLI stops with a clear
    message, exit code 1, and the last good checkpoint restores to finite parameters."""
    from bart_jax.cli import train as cli_train
    from bart_jax.train.checkpoint import Checkpointer

    args = ["--config", "tiny", f"workdir={tmp_path}",
            # a small model: the blow-up, the stop and the last good checkpoint do not depend on its size
            "data.tokenizer_vocab_size=512", *SMALL_MODEL_OVERRIDES,
            "model.dropout=0.0", "pretrain.optimizer.name=adamw", "pretrain.optimizer.learning_rate=1e30",
            "pretrain.optimizer.clip_norm=0", "pretrain.schedule.warmup_steps=0", "pretrain.train.steps=8",
            "pretrain.train.batch_size=8", "pretrain.train.source_length=32", "pretrain.train.eval_every=0",
            "pretrain.train.checkpoint_every=1", "pretrain.train.max_nonfinite=2",
            "pretrain.train.progress_bar=false", "pretrain.train.peak_flops_per_device=1e9",
            "checkpoint.async_save=false"]
    assert cli_train.cli_pretrain(args) == 1
    err = capsys.readouterr().err
    assert "2 consecutive steps with a non-finite loss" in err
    ckpt = Checkpointer(tmp_path / "pretrain" / "checkpoints", read_only=True)
    good = ckpt.latest_step()
    ckpt.close()
    assert good is not None and f"last good checkpoint is step {good}" in err
    assert good < 8
    cfg = C.load_config("tiny", args[2:])
    from bart_jax.train.checkpoint import restore_params
    from bart_jax.train.state import abstract_params as ap

    model = cfg.model.bart_config()
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    shardings = partitioning.logical_to_shardings(param_logical_axes(model), ap(model), mesh)
    params = restore_params(tmp_path / "pretrain" / "checkpoints", ap(model), shardings)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
