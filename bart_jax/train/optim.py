"""Optimizers on optax: LAMB (pretraining) and AdamW (fine-tuning), learning-rate schedules, the
weight-decay mask, the frozen `final_logits_bias` and LAMB's trust ratio computed per layer for scanned
(stacked) parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bart_jax.train.config import OptimizerConfig, ScheduleConfig

# Parameter leaves that get weight decay: matrices and embedding tables. Biases, LayerNorm scales and
# `final_logits_bias` never do (NVIDIA's LAMB recipe decays them by accident).
DECAYED_LEAF_NAMES = ("kernel", "embedding", "lm_head")
# Parameter leaves that are never trained: `final_logits_bias` is a buffer in Hugging Face (no gradient)
# and absent in fairseq, so training it would learn what neither reference learns.
FROZEN_LEAF_NAMES = ("final_logits_bias",)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params) -> Any:
    """Tree of bools like `params`: True where weight decay applies (kernels and embedding tables)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_LEAF_NAMES, params)


def frozen_mask(params) -> Any:
    """Tree of bools like `params`: True for leaves that are never trained (`FROZEN_LEAF_NAMES`)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in FROZEN_LEAF_NAMES, params)


def zero_frozen(grads) -> Any:
    """`grads` with the frozen leaves set to zero (what Hugging Face's buffer would get: nothing)."""
    return jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen_mask(grads))


def hide_frozen(tree, frozen) -> Any:
    """`tree` with its frozen leaves (True in the bool tree `frozen`) replaced by `optax.MaskedNode()`."""
    return jax.tree.map(lambda f, x: optax.MaskedNode() if f else x, frozen, tree)


def freeze(inner: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
    """`inner` applied to the trainable leaves only; frozen leaves get zero updates and no state.

    Like `optax.masked`, frozen leaves are replaced by `optax.MaskedNode()` (a pytree without leaves)
    before `inner` sees them, so `inner`'s state (Adam's mu/nu, ...) holds nothing for them and a global
    clip norm ignores them. Unlike it, frozen updates are zeroed (not passed through) and `inner`'s state
    is returned unwrapped, so the state keeps `inner`'s own structure (a chain's tuple).
    frozen: bool tree like the params (True: frozen), e.g. `frozen_mask(params)`.
    """

    def init_fn(params):
        return inner.init(hide_frozen(params, frozen))

    def update_fn(updates, state, params=None):
        new, state = inner.update(hide_frozen(updates, frozen), state,
                                  None if params is None else hide_frozen(params, frozen))
        out = jax.tree.map(lambda f, u, n: jnp.zeros_like(u) if f else n, frozen, updates, new,
                           is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def layer_axis_tree(logical_axes) -> Any:
    """Tree of bools like the parameters: True where a leaf is stacked over scanned layers (axis 0 'layers').

    logical_axes: the `param_logical_axes(config)` tree of PartitionSpecs of logical names.
    """
    return jax.tree.map(lambda spec: len(spec) > 0 and spec[0] == "layers", logical_axes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def make_schedule(peak: float, sched: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then decay to `end_learning_rate` at `total_steps`."""
    warmup = min(sched.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = sched.end_learning_rate
    if sched.decay == "constant":
        after = optax.constant_schedule(peak)
    elif sched.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif sched.decay == "polynomial":
        after = optax.polynomial_schedule(peak, end, sched.power, decay_steps)
    elif sched.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
    else:
        raise ValueError(f"schedule.decay={sched.decay!r}: expected constant, linear, polynomial or cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


class TrustRatioState(NamedTuple):
    pass


def _norm(x, per_layer: bool):
    """L2 norm of x (fp32); per_layer: one norm per index of axis 0, shaped to broadcast against x."""
    x = x.astype(jnp.float32)
    if not per_layer or x.ndim == 0:
        return jnp.sqrt(jnp.sum(jnp.square(x)))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def scale_by_layerwise_trust_ratio(layer_axes) -> optax.GradientTransformation:
    """LAMB's trust ratio ||w|| / ||u||, with one ratio per scanned layer for stacked leaves.

    `layer_axes`: bool tree like the params (True: axis 0 stacks layers, see `layer_axis_tree`). For
    those leaves norms reduce over every axis but 0, so each layer is its own LAMB "layer" (exactly what
    an unscanned model would get). Like `optax.scale_by_trust_ratio`, the ratio is 1 where either norm is 0.
    """

    def init_fn(params):
        del params
        return TrustRatioState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_layerwise_trust_ratio needs params")

        def scale(u, p, per_layer):
            p_norm = _norm(p, per_layer)
            u_norm = _norm(u, per_layer)
            ratio = jnp.where((p_norm == 0.0) | (u_norm == 0.0), 1.0, p_norm / jnp.where(u_norm == 0.0, 1.0, u_norm))
            return (u.astype(jnp.float32) * ratio).astype(u.dtype)

        return jax.tree.map(scale, updates, params, layer_axes), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int, params_like,
                   logical_axes=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for `opt.name` in {'lamb', 'adamw'}.

    params_like: the parameter tree (arrays or ShapeDtypeStructs) — only its structure and leaf names
    are used (for the weight-decay mask). logical_axes: `param_logical_axes(config)`; needed for LAMB's
    per-layer trust ratio (when None, or `per_layer_trust_ratio` is off, the ratio is per leaf, as optax's).
    Global-norm clipping (`clip_norm` > 0) comes first, on the raw accumulated gradient.
    `final_logits_bias` (`FROZEN_LEAF_NAMES`) is frozen: zero update, no optimizer state (`freeze`); the
    returned state is the chain's tuple (clip?, adam, decay, [trust ratio], learning rate).
    """
    schedule = make_schedule(opt.learning_rate, sched, total_steps)
    frozen = frozen_mask(params_like)
    # The chain runs inside `freeze`, on trees without the frozen leaves: so must its per-leaf masks.
    mask = hide_frozen(weight_decay_mask(params_like), frozen)
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    if opt.name == "lamb":
        if opt.per_layer_trust_ratio and logical_axes is not None:
            layer_axes = layer_axis_tree(logical_axes)
        else:
            layer_axes = jax.tree.map(lambda _: False, params_like)
        layer_axes = hide_frozen(layer_axes, frozen)
        parts += [
            optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
            optax.add_decayed_weights(opt.weight_decay, mask),
            scale_by_layerwise_trust_ratio(layer_axes),
            optax.scale_by_learning_rate(schedule),
        ]
    elif opt.name == "adamw":
        parts += [
            optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
            optax.add_decayed_weights(opt.weight_decay, mask),
            optax.scale_by_learning_rate(schedule),
        ]
    else:
        raise ValueError(f"optimizer.name={opt.name!r}: expected 'lamb' or 'adamw'")
    return freeze(optax.chain(*parts), frozen), schedule
