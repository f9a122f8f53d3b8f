"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters are sharded over 'fsdp' on their 'embed'
dimension and over 'tensor' on 'heads', 'mlp' and 'vocab'; the batch is split over data x fsdp.
Activation names (act_*) have rules of their own so the parameter rule for 'embed' never shards
activations' feature dimension.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flax.linen as nn

from bart_jax.train.config import GRADIENT_REDUCTIONS, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # parameters already reported as not dividing over their mesh axes
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes), in priority order (flax semantics: first free match wins).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with a -1 filled in; raises if they do not multiply to `num_devices`."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                             f"divide the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                         f"{num_devices} are available; use -1 on one axis to fill")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    Axis types are Auto (jax 0.10's make_mesh default is Explicit): sharding inside the step is driven by
    the logical constraints and the jit in/out shardings.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _fits(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "") -> P:
    """`spec` with the mesh axes dropped from any dimension they do not divide evenly (that dimension is
    replicated instead), warning once per parameter `name`."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if names and dim % size:
            if name not in _WARNED:
                _WARNED.add(name)
                logger.warning("%s: dimension %d (size %d) does not divide over mesh axes %s (%d devices); it is "
                               "replicated instead (pad it, e.g. model.pad_vocab_to_multiple_of, or change the mesh)",
                               name or "an array", len(out), dim, axes, size)
            axes = None
        out.append(axes)
    return P(*out)


def _param_name(path) -> str:
    """'encoder/layers/fc1/kernel' for a leaf path; optimizer-state copies of a parameter share its name."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def logical_to_shardings(logical_axes, shapes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedSharding tree from a tree of logical PartitionSpecs and a matching tree of shapes
    (arrays or ShapeDtypeStructs). A dimension not divisible by its mesh axes is replicated, with a
    warning naming the parameter."""
    mesh_specs = nn.logical_to_mesh(logical_axes, rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, x: NamedSharding(mesh, _fits(spec, x.shape, mesh, _param_name(path))),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of any [B, ...] batch array: rows split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def gradient_shard_axes(reduction: str) -> tuple[str, ...]:
    """The mesh axes over which the train step keeps one partial gradient per shard until the step's end
    (`train.gradient_reduction`, bart_jax.train.config.GRADIENT_REDUCTIONS).

    "per_step": data x fsdp. Every batch shard sums its rows' gradient over all micro-batches (the tied
    embedding's uses added locally too) and the step reduces it once: each gradient crosses the network once,
    but every device holds a full float32 gradient (of its tensor slice). "per_micro_batch": data only. Within
    each fsdp group the partitioner reduce-scatters each layer's gradient as the backward pass produces it, as
    FSDP does: the gradient is never whole on a device, and the fsdp links carry it once per micro-batch (the
    tied embedding once per use). Without an fsdp axis the two are the same program.
    """
    if reduction not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradient reduction {reduction!r}: expected one of {GRADIENT_REDUCTIONS}")
    return BATCH_AXES if reduction == "per_step" else ("data",)


def shards_in_context(axes: tuple[str, ...]) -> int:
    """Shards over mesh `axes` of the mesh set by `jax.set_mesh` at trace time; 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def _without(axes, removed: tuple[str, ...]):
    """A PartitionSpec entry with the mesh axes `removed` taken out."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in names if a not in removed)
    return kept[0] if len(kept) == 1 else (kept or None)


def per_shard_rules(rules, axes: tuple[str, ...]) -> tuple:
    """`rules` for code vmapped over the shards of mesh `axes` with `spmd_axis_name=axes`: the vmapped axis
    already takes those mesh axes, so no logical name may map to them again."""
    return tuple((name, _without(mesh_axes, axes)) for name, mesh_axes in rules)


def partial_sum_sharding(sharding: NamedSharding, axes: tuple[str, ...]) -> NamedSharding:
    """The sharding of per-shard partial sums [shards of `axes`, *shape] of an array sharded as `sharding`:
    the leading axis over `axes`, those axes dropped from the others (each shard holds its own partial sum
    of the whole array, or of its slice over the other axes)."""
    return NamedSharding(sharding.mesh, P(axes, *(_without(a, axes) for a in sharding.spec)))


def sum_partials(partial, sharding: NamedSharding, axes: tuple[str, ...]):
    """Sum per-shard partial sums [shards of `axes`, *shape] (`partial_sum_sharding`) into one array sharded
    as `sharding`. Over data x fsdp: over fsdp first (a reduce-scatter onto the fsdp shards, inside a node),
    then over data (an all-reduce of that shard only), so links between fsdp groups carry 1/fsdp of the
    array. Over data alone: an all-reduce of each device's slice."""
    mesh = sharding.mesh
    if "fsdp" in axes:
        rest = tuple(_without(a, axes) for a in sharding.spec)
        per_group = partial.reshape(mesh.shape["data"], mesh.shape["fsdp"], *partial.shape[1:])
        per_group = jax.lax.with_sharding_constraint(per_group, NamedSharding(mesh, P("data", "fsdp", *rest)))
        partial = jax.lax.with_sharding_constraint(per_group.sum(axis=1),
                                                   NamedSharding(mesh, P("data", *sharding.spec)))
    return jax.lax.with_sharding_constraint(partial.sum(axis=0), sharding)


def check_batch_divisible(batch_size: int, micro_batches: int, mesh_or_shards: Mesh | int,
                          what: str = "train.batch_size"):
    """The one rule for a batch's size: it splits into micro-batches of equal rows on every batch shard (data x
    fsdp of a Mesh, or that count). ValueError naming `what` otherwise."""
    shards = mesh_or_shards if isinstance(mesh_or_shards, int) else batch_shards(mesh_or_shards)
    if batch_size % (micro_batches * shards):
        raise ValueError(
            f"{what}={batch_size} must be divisible by micro_batches ({micro_batches}) x the batch shards of "
            f"the mesh (data x fsdp = {shards}) = {micro_batches * shards}")
