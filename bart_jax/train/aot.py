"""Ahead-of-time compilation of the real train step on abstract inputs, and what the compiled program says
about memory and communication per device (bench/scale.py, tests/test_scale.py).

Nothing is allocated: the state and batch are ShapeDtypeStructs, the step is the one `make_train_step` /
`state_shardings` / `compile_train_step` build for the training loop, lowered and compiled for a mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.config import BartConfig
from bart_jax.train import config as C
from bart_jax.train import optim, partitioning

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """A train step's global batch: `batch` sequences of `source_length` source and `target_length`
    target tokens, split into `micro_batches` accumulated micro-batches."""

    batch: int
    source_length: int
    target_length: int
    micro_batches: int = 1


def abstract_batch(shape: StepShape) -> dict:
    """The model batch as int32 ShapeDtypeStructs ([B, S] source, [B, T] target)."""
    b, s, t = shape.batch, shape.source_length, shape.target_length
    i32 = jnp.int32
    return {"input_ids": jax.ShapeDtypeStruct((b, s), i32), "attention_mask": jax.ShapeDtypeStruct((b, s), i32),
            "decoder_input_ids": jax.ShapeDtypeStruct((b, t), i32),
            "decoder_attention_mask": jax.ShapeDtypeStruct((b, t), i32),
            "labels": jax.ShapeDtypeStruct((b, t), i32)}


def lamb(config: BartConfig, total_steps: int = 1000):
    """(optimizer, schedule): the pretraining LAMB (clipping, per-layer trust ratio), as the loop builds it."""
    from bart_jax.model import param_logical_axes
    from bart_jax.train.state import abstract_params

    return optim.make_optimizer(C.OptimizerConfig(name="lamb"), C.ScheduleConfig(warmup_steps=10), total_steps,
                                abstract_params(config), param_logical_axes(config))


def lower_train_step(config: BartConfig, mesh, shape: StepShape, optimizer=None, schedule=None,
                     gradient_reduction: str = "per_step"):
    """(jax.stages.Lowered, shardings, abstract_state) of the train step for `mesh` (a Mesh whose devices
    may be simulated CPU devices), through the same functions the training loop uses."""
    from bart_jax.train.state import state_shardings
    from bart_jax.train.step import compile_train_step, make_train_step

    if optimizer is None:
        optimizer, schedule = lamb(config)
    partitioning.check_batch_divisible(shape.batch, shape.micro_batches, mesh)
    shardings, abstract = state_shardings(config, optimizer, mesh)
    step = compile_train_step(
        make_train_step(config, optimizer, schedule, micro_batches=shape.micro_batches,
                        grad_shardings=shardings.params, gradient_reduction=gradient_reduction), shardings, mesh)
    return step.lower(abstract, abstract_batch(shape)), shardings, abstract


def per_device_bytes(shardings, abstract) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs sharded as `shardings` (the fullest shard)."""
    total = 0
    for sh, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def global_bytes(abstract) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


# ----------------------------------------------------------------------------------- optimized HLO
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (a result type, maybe a tuple)."""
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text))


def _first_group(attrs: str, num_devices: int) -> list[int]:
    """The replica group holding logical device 0 (ids index the mesh's flattened devices): from the mesh
    form `mesh['axis_0'=8,'axis_1'=2] {'axis_1'}` (iota over the axes, the group spans the listed ones),
    an explicit `{{0,1,..},..}`, or an iota `[groups,size]<=[dims]T(perm)`; else all devices."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", attrs)
    if m:
        axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        ids = np.arange(math.prod(size for _, size in axes))
        if m.group(2):  # device_ids=([32,8]T(1,0)): an iota of that shape, transposed, is the device order
            dims = [int(x) for x in re.match(r"\[([\d,]+)\]", m.group(2)).group(1).split(",")]
            perm = re.search(r"T\(([\d,]+)\)", m.group(2))
            ids = ids.reshape(dims)
            if perm:
                ids = ids.transpose([int(x) for x in perm.group(1).split(",")])
        ids = ids.reshape([size for _, size in axes])
        grouped = set(re.findall(r"'([^']+)'", m.group(3)))
        index = tuple(slice(None) if name in grouped else 0 for name, _ in axes)
        return [int(i) for i in ids[index].ravel()]
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m and m.group(1):
        return [int(i) for i in m.group(1).split(",")]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:  # iota form: [groups,size]<=[dims]T(perm) -- arange over dims, transposed, one group per row
        ids = np.arange(int(m.group(1)) * int(m.group(2))).reshape([int(x) for x in m.group(3).split(",")])
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return [int(i) for i in ids.reshape(int(m.group(1)), int(m.group(2)))[0]]
    m = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attrs)
    if m:
        return [int(m.group(1)), int(m.group(2))]
    return list(range(num_devices))


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
    """Every collective of an optimized (post-SPMD-partitioning) HLO module, one dict each:
    {'op', 'computation', 'name', 'op_name' (the jax op it came from), 'bytes' (per-device result bytes;
    for reduce-scatter the full input), 'group' (devices taking part), 'span' (max - min logical device id
    in the group of device 0: <= 8 means inside one 8-GPU node when the mesh is laid out in device order),
    'count' (executions per step: the product of the known trip counts of the while loops around it),
    'traffic' (bytes each device sends per execution under the ring algorithm: all-gather and
    reduce-scatter (g-1)/g of the full buffer, all-reduce 2(g-1)/g, others the buffer)}.
    Async pairs are counted once (at the -start op)."""
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and not line[0].isspace() and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(2), m.group(3), m.group(4), m.group(5)))

    # executions per computation: while bodies run trip-count times; other callees once per call
    counts: dict[str, int] = {}

    def visit(comp: str, times: int):
        counts[comp] = counts.get(comp, 0) + times
        for _, _, op, rest in comps.get(comp, ()):
            trip = 1
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trip = int(m.group(1)) if m else 1
            for callee in re.findall(r"(?:body|to_apply|calls|branch_computations|true_computation|"
                                     r"false_computation)=\{?%?([\w.\-]+)", rest):
                if callee in comps:
                    visit(callee, times * trip)

    if entry is not None:
        visit(entry, 1)
    out = []
    for comp, instrs in comps.items():
        for name, result, op, rest in instrs:
            base = op[:-6] if op.endswith("-start") else op
            if base not in COLLECTIVES or op.endswith("-done"):
                continue
            group = _first_group(rest, num_devices)
            g = len(group)
            nbytes = _shape_bytes(result)
            if base == "reduce-scatter":
                nbytes *= g  # the result is the scattered piece; the ring moves the full input
            if op.endswith("-start") and base in ("all-gather", "collective-permute"):
                # an async start returns (operand, result, ...): count the result, the largest array
                nbytes = max(_shape_bytes(f"{t}[{d}]") for t, d in _SHAPE.findall(result))
            ring = {"all-gather": (g - 1) / g, "reduce-scatter": (g - 1) / g, "all-reduce": 2 * (g - 1) / g}
            meta = re.search(r'op_name="([^"]*)"', rest)
            out.append({"op": base, "computation": comp, "name": name, "bytes": nbytes, "group": g,
                        "span": max(group) - min(group) + 1, "count": counts.get(comp, 0),
                        "traffic": nbytes * ring.get(base, 1.0), "op_name": meta.group(1) if meta else ""})
    return out


def collective_summary(colls: list[dict]) -> dict[str, dict[str, float]]:
    """Per op: {'ops': instructions, 'executions': per step, 'bytes': result bytes moved per step per device,
    'traffic': ring-model bytes sent per device per step}."""
    summary = {op: {"ops": 0, "executions": 0, "bytes": 0, "traffic": 0.0} for op in COLLECTIVES}
    for c in colls:
        s = summary[c["op"]]
        s["ops"] += 1
        s["executions"] += c["count"]
        s["bytes"] += c["bytes"] * c["count"]
        s["traffic"] += c["traffic"] * c["count"]
    return summary


# ----------------------------------------------------------------------------------- StableHLO (dtypes)
_LOC_DEF = re.compile(r'^#(loc\d+) = loc\((?:callsite\()?"([^"]*)"', re.M)
_TENSOR_DTYPE = re.compile(r"tensor<(?:[\d?]+x)*([a-z]+\d*)>")
_OP = re.compile(r"\bstablehlo\.(dot_general|reduce|convert)\b(.*?):\s*\(([^)]*)\)\s*->\s*(\S+?)\s+loc\(#(loc\d+)\)")


def stablehlo_ops(text: str, ops=("dot_general", "reduce")) -> list[dict]:
    """dot_general / reduce / convert ops of StableHLO text lowered with `as_text(debug_info=True)`:
    [{'op', 'operands': operand element types, 'result': result element type, 'name': the jax op name
    path it came from (e.g. '.../transpose(jvp(Bart))/Bart.decode/Bart._logits/.../dot_general')}]."""
    names = dict(_LOC_DEF.findall(text))
    out = []
    for m in _OP.finditer(text):
        if m.group(1) not in ops:
            continue
        operands = _TENSOR_DTYPE.findall(m.group(3))
        result = _TENSOR_DTYPE.findall(m.group(4))
        out.append({"op": m.group(1), "operands": operands, "result": result[0] if result else "",
                    "name": names.get(m.group(5), "")})
    return out
