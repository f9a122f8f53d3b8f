"""The non-finite guard as a unit: `guarded_update` (the optimizer update inside every train step), jitted on a
tiny parameter tree with the product's optimizers, fed NaN/inf gradients and losses directly.

What it promises: a step whose loss or gradient norm is not finite leaves params and optimizer state exactly
as they were, counts itself in `nonfinite_streak` / `nonfinite_total` and is reported as skipped; a finite
step applies the update and resets the streak (not the total); a batch without target tokens is skipped
without counting as divergence. The CLI's stop after K such steps is tested end to end in test_train_step.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.train import config as C
from bart_jax.train import optim
from bart_jax.train.state import TrainState
from bart_jax.train.step import guarded_update

# A stand-in for the model's tree: a decayed kernel, a bias and the frozen `final_logits_bias`.
PARAMS = {
    "layer": {"kernel": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3),
              "bias": np.array([0.1, -0.2, 0.3], np.float32)},
    "final_logits_bias": np.zeros((1, 5), np.float32),
}


def grads_like(value=0.5):
    return jax.tree.map(lambda p: np.full(p.shape, value, np.float32), PARAMS)


def setup(name):
    """(fresh TrainState, jitted update(state, grads, loss, tokens)) for the product's optimizer `name`."""
    opt_cfg = C.OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.01, clip_norm=1.0)
    optimizer, _ = optim.make_optimizer(opt_cfg, C.ScheduleConfig(decay="constant"), 10, PARAMS)
    params = jax.tree.map(jnp.asarray, PARAMS)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, updates=zero, params=params, opt_state=optimizer.init(params),
                       rng=jax.random.PRNGKey(0), nonfinite_streak=zero, nonfinite_total=zero)
    update = jax.jit(lambda s, g, loss, tokens: guarded_update(s, g, loss, tokens, optimizer))
    return state, update


def step(update, state, grads, loss, tokens=10):
    return update(state, grads, jnp.float32(loss), jnp.int32(tokens))


def assert_untouched(before, after):
    chex.assert_trees_all_equal(jax.device_get(after.params), jax.device_get(before.params))
    chex.assert_trees_all_equal(jax.device_get(after.opt_state), jax.device_get(before.opt_state))


@pytest.mark.parametrize("name", ["lamb", "adamw"])
@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_loss", "inf_loss"])
def test_nonfinite_step_leaves_state_unchanged_and_is_counted(name, bad):
    state, update = setup(name)
    state, _ = step(update, state, grads_like(), 1.0)  # a real update first: Adam's moments are nonzero
    grads, loss = grads_like(), 1.0
    if bad.endswith("grad"):
        grads["layer"]["kernel"][2, 1] = np.nan if bad == "nan_grad" else np.inf
    else:
        loss = np.nan if bad == "nan_loss" else np.inf
    after, m = step(update, state, grads, loss)
    assert_untouched(state, after)
    assert int(after.step) == 2 and int(after.updates) == 1  # the batch is consumed, no update applied
    assert int(m["skipped"]) == 1
    assert int(after.nonfinite_streak) == int(m["nonfinite_streak"]) == 1
    assert int(after.nonfinite_total) == int(m["nonfinite_total"]) == 1


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_streak_grows_and_a_finite_step_resets_it(name):
    state, update = setup(name)
    nan_grads = grads_like(np.nan)
    streaks, totals, skipped = [], [], []
    for grads, loss in [(nan_grads, 1.0), (grads_like(), np.inf), (grads_like(), 1.0), (nan_grads, 1.0)]:
        before = state
        state, m = step(update, state, grads, loss)
        streaks.append(int(m["nonfinite_streak"]))
        totals.append(int(m["nonfinite_total"]))
        skipped.append(int(m["skipped"]))
        if skipped[-1] == 0:  # the finite step did train
            assert not np.array_equal(np.asarray(state.params["layer"]["kernel"]), PARAMS["layer"]["kernel"])
        else:
            assert_untouched(before, state)
    assert streaks == [1, 2, 0, 1] and totals == [1, 2, 2, 3] and skipped == [1, 1, 0, 1]
    assert int(state.step) == 4 and int(state.updates) == 1


def test_no_target_tokens_is_skipped_but_not_divergence():
    state, update = setup("adamw")
    after, m = step(update, state, grads_like(), 0.0, tokens=0)
    assert_untouched(state, after)
    assert int(m["skipped"]) == 1 and int(after.updates) == 0 and int(after.step) == 1
    assert int(m["nonfinite_streak"]) == 0 and int(m["nonfinite_total"]) == 0


def test_frozen_leaf_gradient_does_not_trip_the_guard():
    """`final_logits_bias` gets no gradient (a buffer in Hugging Face): whatever the autodiff gave it is
    neither counted in the norm nor taken for divergence, and the leaf stays put."""
    state, update = setup("adamw")
    grads = grads_like()
    grads["final_logits_bias"][0, 3] = np.nan
    after, m = step(update, state, grads, 1.0)
    assert int(m["skipped"]) == 0 and int(m["nonfinite_streak"]) == 0 and int(after.updates) == 1
    assert np.isfinite(float(m["grad_norm"]))
    np.testing.assert_array_equal(np.asarray(after.params["final_logits_bias"]), PARAMS["final_logits_bias"])
    assert np.all(np.isfinite(np.asarray(after.params["layer"]["kernel"])))
