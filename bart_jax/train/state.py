"""The train state (parameters, optimizer state, step, PRNG, non-finite counters) and its sharded creation.

Follows flax's lm1b `setup_initial_state`: shapes by `jax.eval_shape`, shardings from the logical axis
rules, then a jit-compiled init with `out_shardings`, so no full copy of the parameters ever lives on
one device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from bart_jax.config import BartConfig
from bart_jax.train import partitioning


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs on device.

    step: int32 [] — batches consumed (it drives the dropout and noise keys and the data position).
    updates: int32 [] — optimizer updates applied (the learning-rate schedule's step; skipped steps —
      non-finite, or a batch without target tokens — do not count).
    params: parameter tree (param_dtype, the fp32 master copy under mixed precision).
    opt_state: optax state (same dtype as the parameters).
    rng: uint32 [2] — raw PRNG key for dropout (folded with `step` each step).
    nonfinite_streak: int32 [] — consecutive skipped (NaN/inf) steps; nonfinite_total: int32 [] — all of them.
    """

    step: jax.Array
    updates: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array


def _state_from_params(params, optimizer: optax.GradientTransformation, seed_key) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32), params=params,
        opt_state=optimizer.init(params),
        rng=seed_key, nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))


def abstract_params(config: BartConfig):
    """ShapeDtypeStruct tree of the parameters (nothing allocated)."""
    from bart_jax.model import init_params

    return jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))


def boxed_abstract_params(config: BartConfig):
    """The parameters' ShapeDtypeStructs, each boxed with its logical axis names (`nn.LogicallyPartitioned`),
    as the model declares them: what `state_shardings` derives every state sharding from."""
    from bart_jax.model import param_logical_axes

    return jax.tree.map(lambda spec, x: nn.LogicallyPartitioned(x, tuple(spec)), param_logical_axes(config),
                        abstract_params(config), is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(config: BartConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules=partitioning.LOGICAL_AXIS_RULES, boxed_params=None):
    """(TrainState of NamedShardings, TrainState of ShapeDtypeStructs) for this model/optimizer/mesh.

    As flax's lm1b: the state is built abstractly from boxed parameters, so the optimizer's copies of them
    (Adam's mu/nu) carry the same logical names, and `nn.get_partition_spec` reads every leaf's spec
    (unboxed leaves — step counts, the PRNG key — are replicated).
    boxed_params: `boxed_abstract_params(config)` when the caller has it already.
    """
    boxed = boxed_abstract_params(config) if boxed_params is None else boxed_params
    boxed_state = jax.eval_shape(lambda p: _state_from_params(p, optimizer, jax.random.PRNGKey(0)), boxed)
    abstract = nn.meta.unbox(boxed_state)
    shardings = partitioning.logical_to_shardings(nn.get_partition_spec(boxed_state), abstract, mesh, rules)
    return shardings, abstract


def create_train_state(config: BartConfig, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
                       params=None, rules=partitioning.LOGICAL_AXIS_RULES):
    """A fresh sharded TrainState and its shardings (`state_shardings` then `init_train_state`).

    params: None initialises the model from `seed`; otherwise a parameter tree (numpy or jax arrays,
    e.g. a pretrained checkpoint or an imported Hugging Face model) that must match the model's
    structure and shapes; it is cast to `param_dtype`.
    Returns (state, shardings) where shardings is a TrainState of NamedShardings.
    """
    shardings, abstract = state_shardings(config, optimizer, mesh, rules)
    return init_train_state(config, optimizer, mesh, seed, shardings, abstract, params), shardings


def init_train_state(config: BartConfig, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
                     shardings: TrainState, abstract: TrainState, params=None) -> TrainState:
    """A fresh TrainState placed on `shardings` (from `state_shardings`; `params` as `create_train_state`),
    made by one jit with `out_shardings`, so no device ever holds more than its shards."""
    from bart_jax.model import init_params

    # Dropout stream independent of the init stream.
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
        make = jax.jit(lambda k, d: _state_from_params(init_params(config, k), optimizer, d),
                       out_shardings=shardings)
        with jax.set_mesh(mesh):
            return make(init_key, dropout_key)
    check_params_match(params, abstract.params)

    def place(x, a):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
            return x.astype(a.dtype)  # already on the mesh (e.g. restored from a checkpoint)
        # A host copy: device_put then gives every process just its own shards (works multi-host).
        return np.asarray(x, dtype=a.dtype)

    params = jax.device_put(jax.tree.map(place, params, abstract.params), shardings.params)
    make = jax.jit(lambda p, d: _state_from_params(p, optimizer, d), out_shardings=shardings, donate_argnums=0)
    with jax.set_mesh(mesh):
        return make(params, dropout_key)


def check_params_match(params, expected) -> None:
    """Raise a ValueError naming the first leaf whose path or shape differs from the model's."""
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"parameters do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in want.items():
        if got[k] != shape:
            raise ValueError(f"parameter {k} has shape {got[k]}, the model expects {shape}")
