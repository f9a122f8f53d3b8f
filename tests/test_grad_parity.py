"""Training numerics pinned against PyTorch (tests/fixtures/<model>/training.npz, made by
make_training_fixtures.py): one step's loss and gradients through bart_jax's own train step equal
`loss.backward()`'s, and 20 AdamW steps follow PyTorch's losses.

The loss both sides compute is HF's: plain mean cross-entropy over the target tokens (labels padded with
-100; no label smoothing, dropout off). Gradients are compared in Hugging Face names through the
converter's own mapping (`params_to_hf_state_dict`), so a layout bug there shows up here too.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bart_jax import from_pretrained
from bart_jax.convert import params_to_hf_state_dict
from bart_jax.train import config as C
from bart_jax.train import optim, partitioning
from bart_jax.train.state import create_train_state
from bart_jax.train.step import MODEL_KEYS, compile_train_step, make_train_step
from xla_env import USER_OPTIMISATION

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = ("bart_default", "mbart_preln")
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def fixture(name):
    return dict(np.load(os.path.join(FIXTURES, name, "training.npz")))


def load(name, dtype="float32"):
    config, params = from_pretrained(os.path.join(FIXTURES, name), **NO_DROPOUT)
    if dtype == "float64":
        config = config.replace(dtype="float64", param_dtype="float64")
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    return config, params


def capturing(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, with the gradient the train step hands it kept in the state: (gradient, inner state)."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params), inner.init(params)

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state[1], params)
        return updates, (grads, inner_state)

    return optax.GradientTransformation(init, update)


@functools.lru_cache(maxsize=None)
def adamw_run(name, dtype="float32"):
    """bart_jax's compiled train step (one device, label smoothing 0, dropout off) with the fixture's
    AdamW (no clipping, constant learning rate) for as many steps as the fixture, from the converted weights.

    Returns (losses [steps] float64, the first step's gradient in HF names without final_logits_bias,
    that gradient's final_logits_bias). One compile per model and dtype, shared by the tests below.
    """
    ref = fixture(name)
    lr, b1, b2, eps, wd = (float(x) for x in ref["adamw_hparams"])
    steps = len(ref["adamw_losses_f32"])
    with jax.enable_x64(dtype == "float64"):
        config, params = load(name, dtype)
        adamw, _ = optim.make_optimizer(
            C.OptimizerConfig(name="adamw", learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                              clip_norm=0.0),
            C.ScheduleConfig(warmup_steps=0, decay="constant"), steps, params)
        optimizer = capturing(adamw)
        mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
        state, shardings = create_train_state(config, optimizer, mesh, seed=0, params=params)
        step = compile_train_step(make_train_step(config, optimizer, optax.constant_schedule(lr),
                                                  label_smoothing=0.0), shardings, mesh)
        batch = jax.device_put({k: ref[k].astype(np.int32) for k in MODEL_KEYS},
                               partitioning.batch_sharding(mesh))
        # At the optimisation level users run (the suite's LLVM -O0 orders float32 sums otherwise).
        step = step.lower(state, batch).compile(compiler_options=USER_OPTIMISATION)
        losses, grads = [], None
        for _ in range(steps):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
            assert m["loss"].dtype == np.dtype(dtype)
            if grads is None:
                grads = params_to_hf_state_dict(config, jax.device_get(state.opt_state[0]), dtype=np.dtype(dtype))
    bias = grads.pop("final_logits_bias")
    return np.asarray(losses, np.float64), grads, bias


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_pytorch_float32(name):
    ref = fixture(name)
    losses, grads, bias = adamw_run(name)
    np.testing.assert_allclose(losses[0], ref["loss_f64"], rtol=2e-7, atol=0)
    assert not np.any(bias)  # frozen: no gradient, as HF's buffer
    torch_names = sorted(k[len("grad_f64/"):] for k in ref if k.startswith("grad_f64/"))
    assert sorted(grads) == torch_names
    # Against PyTorch's float64 gradient, within a multiple of how far PyTorch's own float32 gradient is
    # off (per tensor and model-wide, both measured by the fixture script) plus 32 float32 roundings of
    # the tensor's largest entry. XLA's float32 sums block and fuse differently from PyTorch's, and
    # differently on each CPU: on bart_default's sharply peaked decoder self-attention they land ~9x
    # (Intel AVX-512) to ~12x (AMD EPYC) PyTorch's own spread, ~2e-6 of max|g|; a wrong gradient is off by ~|g|.
    model_spread = max(float(ref[k]) for k in ref if k.startswith("spread32/"))
    for n in torch_names:
        g64, spread = ref[f"grad_f64/{n}"], float(ref[f"spread32/{n}"])
        err = float(np.max(np.abs(grads[n].astype(np.float64) - g64)))
        tol = 8 * spread + 2 * model_spread + 32 * 2.0 ** -24 * float(np.max(np.abs(g64)))
        assert err <= tol, f"{n}: max |bart_jax - torch fp64| {err:.3g} > {tol:.3g} (torch fp32 spread {spread:.3g})"


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_pytorch_float64(name):
    """Exactness beyond float32 noise: the same gradient in float64 agrees with torch's to ~1e-12."""
    ref = fixture(name)
    losses, grads, bias = adamw_run(name, "float64")
    np.testing.assert_allclose(losses[0], ref["loss_f64"], rtol=1e-12, atol=0)
    assert not np.any(bias)
    for n, g in grads.items():
        np.testing.assert_allclose(g, ref[f"grad_f64/{n}"], atol=1e-9, rtol=0, err_msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_adamw_losses_follow_pytorch_float32(name):
    """20 AdamW steps on one batch from the converted weights (the fixture's torch.optim.AdamW
    hyper-parameters and decay mask) follow PyTorch's float32 losses within k times its own fp32/fp64
    spread (~2 float32 ulps of the loss)."""
    ref = fixture(name)
    ours, _, _ = adamw_run(name)
    t32, t64 = ref["adamw_losses_f32"].astype(np.float64), ref["adamw_losses_f64"]
    # k=25. Measured: bart_jax's float32 run sits 8.7x (bart_default) and 13x (mbart_preln) that spread
    # from PyTorch's, though the float64 runs agree to 1e-15 (next test), so the algorithm is the same and
    # the gap is float32 rounding that Adam's normalised early steps amplify. For scale: a flipped
    # weight-decay mask moves the losses ~1500x the spread, Adam eps 1e-6 instead of 1e-8 ~60x.
    tol = 25 * float(np.max(np.abs(t32 - t64)))
    assert np.max(np.abs(ours - t32)) <= tol, (ours - t32, tol)
    assert t64[-1] < 0.5 * t64[0]  # the 20 steps really train


@pytest.mark.parametrize("name", MODELS)
def test_adamw_losses_match_pytorch_float64(name):
    """The same 20 AdamW steps in float64 follow PyTorch's float64 losses exactly (to ~1e-15): same Adam,
    same bias correction and epsilon placement, same decoupled weight decay and decay mask."""
    ref = fixture(name)
    ours, _, _ = adamw_run(name, "float64")
    np.testing.assert_allclose(ours, ref["adamw_losses_f64"], atol=1e-11, rtol=0)
