"""Optimizers on optax: LAMB (pretraining) and AdamW (fine-tuning), learning-rate schedules, the
weight-decay mask and LAMB's trust ratio computed per layer for scanned (stacked) parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bart_jax.train.config import OptimizerConfig, ScheduleConfig

# Parameter leaves that get weight decay: matrices and embedding tables. Biases, LayerNorm scales and
# `final_logits_bias` never do (NVIDIA's LAMB recipe decays them by accident).
DECAYED_LEAF_NAMES = ("kernel", "embedding", "lm_head")


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params) -> Any:
    """Tree of bools like `params`: True where weight decay applies (kernels and embedding tables)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_LEAF_NAMES, params)


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
    """
    schedule = make_schedule(opt.learning_rate, sched, total_steps)
    mask = weight_decay_mask(params_like)
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    if opt.name == "lamb":
        if opt.per_layer_trust_ratio and logical_axes is not None:
            layer_axes = layer_axis_tree(logical_axes)
        else:
            layer_axes = jax.tree.map(lambda _: False, params_like)
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
    return optax.chain(*parts), schedule
