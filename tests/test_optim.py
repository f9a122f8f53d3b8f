"""Optimizer factory, schedules, weight-decay mask, per-layer LAMB trust ratio, loss and run config."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bart_jax import preset
from bart_jax.train import config as C
from bart_jax.train import optim
from bart_jax.train.step import loss_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ decay mask
def test_weight_decay_mask_covers_only_matrices_and_embeddings():
    from bart_jax.train.state import abstract_params

    params = abstract_params(preset("tiny"))
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['shared']['embedding']"]
    assert flat["['encoder']['layers']['ffn']['fc1']['kernel']"]
    assert flat["['decoder']['layers']['encoder_attn']['q_proj']['kernel']"]
    assert not flat["['final_logits_bias']"]
    assert not flat["['encoder']['layers']['self_attn']['q_proj']['bias']"]  # 2-D per layer, still a bias
    assert not flat["['decoder']['layers']['final_layer_norm']['scale']"]
    assert not flat["['encoder']['layernorm_embedding']['bias']"]
    for key, decayed in flat.items():
        assert decayed == key.endswith(("['kernel']", "['embedding']")), key


def test_weight_decay_skips_masked_leaves():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}
    opt, _ = optim.make_optimizer(
        C.OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.5, clip_norm=0.0),
        C.ScheduleConfig(decay="constant"), 10, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    chex.assert_trees_all_close(updates["dense"]["kernel"], -0.1 * 0.5 * jnp.ones((2, 2)))
    chex.assert_trees_all_close(updates["dense"]["bias"], jnp.zeros(2))
    chex.assert_trees_all_close(updates["norm"]["scale"], jnp.zeros(2))


# ------------------------------------------------------------------------------------------ trust ratio
def _stacked_and_unstacked(key, layers=3):
    k = jax.random.split(key, 4)
    stacked = {"layers": {"kernel": jax.random.normal(k[0], (layers, 4, 5)),
                          "bias": jax.random.normal(k[1], (layers, 5)) * 0.1},
               "head": {"kernel": jax.random.normal(k[2], (5, 7))}}
    logical = {"layers": {"kernel": P("layers", "embed", "mlp"), "bias": P("layers", "mlp")},
               "head": {"kernel": P("embed", "vocab")}}
    unstacked = {f"layer{i}": {"kernel": stacked["layers"]["kernel"][i], "bias": stacked["layers"]["bias"][i]}
                 for i in range(layers)}
    unstacked["head"] = stacked["head"]
    return stacked, logical, unstacked


def _restack(unstacked, layers=3):
    return {"layers": {n: jnp.stack([unstacked[f"layer{i}"][n] for i in range(layers)]) for n in ("kernel", "bias")},
            "head": unstacked["head"]}


def test_lamb_per_layer_trust_ratio_matches_unscanned_layers():
    """LAMB on stacked (scanned) layers == LAMB on the same layers as separate leaves, over several steps."""
    stacked, logical, unstacked = _stacked_and_unstacked(jax.random.PRNGKey(0))
    opt_cfg = C.OptimizerConfig(name="lamb", learning_rate=0.05, weight_decay=0.01, clip_norm=0.0)
    sched = C.ScheduleConfig(warmup_steps=2, decay="linear")
    opt_s, _ = optim.make_optimizer(opt_cfg, sched, 10, stacked, logical)
    opt_u, _ = optim.make_optimizer(opt_cfg, sched, 10, unstacked)  # one trust ratio per leaf == per layer
    state_s, state_u = opt_s.init(stacked), opt_u.init(unstacked)
    ps, pu = stacked, unstacked
    for step in range(4):
        g = jax.tree.map(lambda x: jnp.sin(x * (step + 1.3)), ps)
        gu = {**{f"layer{i}": {n: g["layers"][n][i] for n in ("kernel", "bias")} for i in range(3)}, "head": g["head"]}
        us, state_s = opt_s.update(g, state_s, ps)
        uu, state_u = opt_u.update(gu, state_u, pu)
        ps, pu = optax.apply_updates(ps, us), optax.apply_updates(pu, uu)
    chex.assert_trees_all_close(ps, _restack(pu), rtol=1e-6, atol=1e-7)


def test_per_leaf_trust_ratio_differs_on_stacked_layers():
    """Sanity: without per-layer norms the stacked result is different (so the test above can fail)."""
    stacked, logical, unstacked = _stacked_and_unstacked(jax.random.PRNGKey(1))
    opt_cfg = C.OptimizerConfig(name="lamb", learning_rate=0.05, clip_norm=0.0, per_layer_trust_ratio=False)
    opt_s, _ = optim.make_optimizer(opt_cfg, C.ScheduleConfig(decay="constant"), 10, stacked, logical)
    opt_u, _ = optim.make_optimizer(opt_cfg, C.ScheduleConfig(decay="constant"), 10, unstacked)
    g = jax.tree.map(lambda x: x * jnp.arange(1, x.shape[0] + 1).reshape((-1,) + (1,) * (x.ndim - 1)) ** 3, stacked)
    gu = {**{f"layer{i}": {n: g["layers"][n][i] for n in ("kernel", "bias")} for i in range(3)}, "head": g["head"]}
    us, _ = opt_s.update(g, opt_s.init(stacked), stacked)
    uu, _ = opt_u.update(gu, opt_u.init(unstacked), unstacked)
    assert not np.allclose(us["layers"]["kernel"], _restack(uu)["layers"]["kernel"], rtol=1e-3)


def test_trust_ratio_is_one_for_zero_norms():
    tr = optim.scale_by_layerwise_trust_ratio({"w": True})
    params = {"w": jnp.stack([jnp.zeros((2, 2)), jnp.ones((2, 2))])}
    updates = {"w": jnp.stack([jnp.ones((2, 2)), jnp.zeros((2, 2))])}
    out, _ = tr.update(updates, tr.init(params), params)
    chex.assert_trees_all_close(out, updates)


def test_global_norm_clipping_comes_first():
    params = {"kernel": jnp.ones((3,))}
    opt, _ = optim.make_optimizer(C.OptimizerConfig(name="adamw", learning_rate=1.0, weight_decay=0.0,
                                                    clip_norm=1.0, b1=0.0),
                                  C.ScheduleConfig(decay="constant"), 10, params)
    _, state = opt.update({"kernel": jnp.full((3,), 100.0)}, opt.init(params), params)
    adam_state = state[1]  # chain: (clip, adam, decay, lr); with b1=0 Adam's mu is the gradient it saw
    np.testing.assert_allclose(float(jnp.linalg.norm(adam_state.mu["kernel"])), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("decay", ["linear", "polynomial", "cosine", "constant"])
def test_schedule_warmup_then_decay(decay):
    sched = optim.make_schedule(1e-3, C.ScheduleConfig(warmup_steps=10, decay=decay, power=2.0,
                                                       end_learning_rate=1e-5), total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    end = float(sched(110))
    if decay == "constant":
        np.testing.assert_allclose(end, 1e-3, rtol=1e-6)
    else:
        np.testing.assert_allclose(end, 1e-5, rtol=1e-4)
        mid = float(sched(60))
        expected = {"linear": 1e-5 + (1e-3 - 1e-5) * 0.5, "polynomial": 1e-5 + (1e-3 - 1e-5) * 0.25,
                    "cosine": 1e-5 + (1e-3 - 1e-5) * 0.5}[decay]
        np.testing.assert_allclose(mid, expected, rtol=1e-4)


# ------------------------------------------------------------------------------------------ loss
def test_label_smoothed_loss_matches_numpy_and_ignores_pad():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 7).astype(np.float32)
    labels = np.array([[4, 5, 1], [2, 1, 1]], np.int32)  # pad id 1
    eps = 0.1
    sm, nll, correct, count = loss_sums(jnp.asarray(logits), jnp.asarray(labels), 1, eps)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mask = labels != 1
    tgt = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    smooth = -logp.mean(-1)
    np.testing.assert_allclose(float(nll), tgt[mask].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sm), ((1 - eps) * tgt + eps * smooth)[mask].sum(), rtol=1e-5)
    assert int(count) == 3
    assert float(correct) == float(((logits.argmax(-1) == labels) & mask).sum())


@pytest.mark.parametrize("form", ["all_classes", "other_classes"])
def test_label_smoothing_forms_match_explicit_target_distributions(form):
    """Cross-entropy against the smoothed target distribution written out: PyTorch/Hugging Face put eps/V on
    every class (the target then has 1 - eps + eps/V), fairseq eps/(V-1) on each other class (target 1 - eps)."""
    rng = np.random.RandomState(1)
    vocab, eps = 7, 0.2
    logits = rng.randn(2, 4, vocab)
    labels = np.array([[4, 5, 0, 1], [2, 6, 1, 1]], np.int32)  # pad id 1
    mask = labels != 1
    onehot = np.eye(vocab)[labels]
    if form == "all_classes":
        target = (1 - eps) * onehot + eps / vocab
    else:
        target = (1 - eps) * onehot + eps / (vocab - 1) * (1 - onehot)
    np.testing.assert_allclose(target.sum(-1), 1.0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(target * logp).sum(-1)[mask].sum()
    sm, nll, _, count = loss_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 1, eps, form)
    np.testing.assert_allclose(float(sm), want, rtol=1e-5)
    np.testing.assert_allclose(float(nll), -(onehot * logp).sum(-1)[mask].sum(), rtol=1e-5)
    assert int(count) == int(mask.sum())


def test_label_smoothing_forms_differ_and_unknown_form_is_refused():
    logits, labels = jnp.asarray(np.random.RandomState(2).randn(1, 3, 5), jnp.float32), jnp.array([[0, 2, 3]])
    a = loss_sums(logits, labels, 1, 0.1, "all_classes")[0]
    b = loss_sums(logits, labels, 1, 0.1, "other_classes")[0]
    assert abs(float(a) - float(b)) > 1e-4
    with pytest.raises(ValueError, match="label smoothing form 'fairseq'"):
        loss_sums(logits, labels, 1, 0.1, "fairseq")


def test_loss_of_all_padding_batch_is_zero_not_nan():
    sm, nll, _, count = loss_sums(jnp.zeros((2, 3, 5)), jnp.ones((2, 3), jnp.int32), 1, 0.1)
    assert int(count) == 0 and float(sm) == 0.0 and float(nll) == 0.0


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_shipped_configs_load(name):
    cfg = C.load_config(name)
    assert cfg.pretrain.optimizer.name == "lamb" and cfg.finetune.optimizer.name == "adamw"
    cfg.model.bart_config()  # a valid architecture
    cfg.noise.noise_config()
    assert C.RunConfig.from_dict(cfg.to_dict()) == cfg  # round trip (what checkpoints store)


def test_large_config_mirrors_published_recipes():
    cfg = C.load_config("large")
    assert cfg.model.bart_config().d_model == 1024
    assert cfg.pretrain.optimizer.learning_rate == 5e-3 and cfg.pretrain.train.source_length == 128
    assert cfg.finetune.optimizer.learning_rate == 3e-5
    assert cfg.finetune.train.label_smoothing == 0.1 and cfg.model.bart_config().dropout == 0.1
    phase2 = C.load_config("large", variant="phase2")
    assert phase2.pretrain.optimizer.learning_rate == 4e-3 and phase2.pretrain.train.source_length == 512


def test_overrides_are_typed_and_checked():
    cfg = C.load_config("tiny",
                        ["pretrain.train.steps=7", "model.dtype=bfloat16", "pretrain.optimizer.learning_rate=1e-4",
                         "mesh.fsdp=2", "checkpoint.async_save=false", "finetune.init_from=null"])
    assert cfg.pretrain.train.steps == 7 and isinstance(cfg.pretrain.train.steps, int)
    assert cfg.model.bart_config().dtype == "bfloat16"
    assert cfg.pretrain.optimizer.learning_rate == 1e-4
    assert cfg.mesh.fsdp == 2 and cfg.checkpoint.async_save is False and cfg.finetune.init_from is None
    for bad, needle in [("pretrain.train.stepz=3", "stepz"), ("pretrain.train.steps=abc", "integer"),
                        ("model.d_modle=3", "d_modle"), ("model.d_model=x", "integer"),
                        ("pretrain.optimizer.name=sgd", "lamb"), ("nosuch.key=1", "nosuch"),
                        ("pretrain.train.steps", "key=value"), ("mesh.data=0", "mesh.data"),
                        ("checkpoint.async_save=3", "true/false")]:
        with pytest.raises(ValueError, match=needle):
            C.load_config("tiny", [bad])


def test_bad_yaml_reports_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pretrain:\n  train:\n    steps: 3\n    bogus: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*bogus"):
        C.load_config(p)
    with pytest.raises(ValueError, match="no variant"):
        C.load_config("tiny", variant="nope")
    # Without a file: the default run config, the same one `bart-jax run` reads.
    assert C.load_config(None, ["workdir=/x"]) == C.load_config(C.DEFAULT_CONFIG, ["workdir=/x"])
