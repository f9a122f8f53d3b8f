"""The compiled train step moves the bytes the analytic minimum says, per collective kind, read from the
optimized HLO of tiny shapes on 8 simulated devices (`aot.collectives`, the counter bench/scale.py uses).

Data and fsdp layouts: each parameter's gradient crosses the network once per step (one ring all-reduce,
or reduce-scatter, after the micro-batches are summed locally; the tied embedding's three uses summed before
it), and FSDP gathers each sharded weight once per forward and once per backward pass. Tensor layouts:
the row-parallel projections' activation all-reduces, counted as Megatron-style tensor parallelism
counts them. Compute is float32 here: XLA:CPU widens bf16 collectives to f32 anyway.
"""

import dataclasses
import functools
import math
import re

import jax
import pytest

from bart_jax import preset
from bart_jax.train import aot, partitioning
from bart_jax.train import config as C

# A 1024-token vocabulary makes the tied embedding a quarter of the parameters, so reducing it once per
# use instead of once per step shows in the totals.
MODEL = preset("tiny", dropout=0.1, vocab_size=1024, max_position_embeddings=32)
SHAPE = aot.StepShape(batch=16, source_length=16, target_length=16, micro_batches=2)
LAYERS = MODEL.encoder_layers  # = decoder_layers
SLACK = 1.1


def compile_for(layout, micro_batches=SHAPE.micro_batches, gradient_reduction="per_step"):
    """(collectives, param bytes, per-device param bytes, bytes of the parameters split over fsdp)."""
    return _compile(layout, micro_batches, gradient_reduction)[:4]


@functools.cache
def _compile(layout, micro_batches, gradient_reduction):
    """compile_for's values and the step's temporary bytes per device."""
    mesh = partitioning.make_mesh(C.MeshConfig(*layout))
    shape = dataclasses.replace(SHAPE, micro_batches=micro_batches)
    lowered, _, abstract = aot.lower_train_step(MODEL, mesh, shape, gradient_reduction=gradient_reduction)
    compiled = lowered.compile()
    shardings = compiled.input_shardings[0][0].params
    split = sum(math.prod(x.shape) * x.dtype.itemsize
                for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract.params))
                if s.shard_shape(x.shape) != x.shape)
    return (aot.collectives(compiled.as_text(), 8), aot.global_bytes(abstract.params),
            aot.per_device_bytes(shardings, abstract.params), split, compiled.memory_analysis().temp_size_in_bytes)


def moved(colls, op, group=None, big=0):
    """Result bytes per device per step of collective `op` (in groups of `group` devices), ops of at least
    `big` bytes only."""
    return sum(c["bytes"] * c["count"] for c in colls
               if c["op"] == op and (group is None or c["group"] == group) and c["bytes"] >= big)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_data_parallel_all_reduces_the_gradient_once_per_step(micro_batches):
    colls, params, _, _ = compile_for((8, 1, 1), micro_batches)
    # One all-reduce of the float32 gradient, whatever the number of micro-batches (not one per
    # micro-batch) and with the embedding counted once (not once per use: lookups and the output projection).
    reduced = moved(colls, "all-reduce")
    assert 0.95 * params <= reduced <= SLACK * params, (reduced / params, micro_batches)
    # Nothing else of any size crosses the network.
    others = [c for c in colls if c["op"] != "all-reduce" and c["bytes"] > 0.001 * params]
    assert not others, others


def test_fsdp_gathers_each_weight_per_pass_and_reduces_the_gradient_once():
    colls, params, _, split = compile_for((1, 8, 1))
    # The gradient: one reduce-scatter of the float32 gradient per step (XLA:CPU emits it as an all-reduce
    # of the full buffer followed by a slice; XLA:GPU as a reduce-scatter).
    reduced = moved(colls, "all-reduce", group=8) + moved(colls, "reduce-scatter", group=8)
    assert 0.95 * params <= reduced <= SLACK * params, reduced / params
    # The weights: every one split over fsdp is gathered for the forward and again for the backward of
    # each micro-batch, and nothing more (XLA may keep a gathered table across micro-batches: fewer).
    gathered = moved(colls, "all-gather")
    assert gathered <= SLACK * 2 * SHAPE.micro_batches * split, gathered / split
    in_layers = [c for c in colls if c["op"] == "all-gather" and c["count"] == SHAPE.micro_batches * LAYERS]
    assert len(in_layers) >= 2 * 2 * 6, len(in_layers)  # q, k, v, out, fc1, fc2: forward and backward


def test_fsdp_gathers_layer_weights_in_the_compute_dtype(tmp_path):
    # bf16 compute: the SPMD partitioner gathers each layer's weights after their cast to bf16. (XLA:CPU's
    # float normalization then widens bf16 collectives to f32, so only the partitioned module, before the
    # backend's passes, shows what XLA:GPU moves.)
    model = preset("tiny", dropout=0.1, vocab_size=1024, max_position_embeddings=32, dtype="bfloat16",
                   param_dtype="float32")
    lowered, _, _ = aot.lower_train_step(model, partitioning.make_mesh(C.MeshConfig(1, 8, 1)), SHAPE)
    lowered.compile(compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"})
    (partitioned,) = tmp_path.glob("*train_step*after_spmd-partitioning*.txt")
    gathers = re.findall(r'= (\w+)\[[^\]]*\]\S* all-gather\(.*op_name="([^"]*)"', partitioned.read_text())
    layers = [dtype for dtype, name in gathers if "/layers/" in name]
    assert len(layers) >= 2 * 2 * 6 and set(layers) == {"bf16"}, gathers


def test_data_and_fsdp_reduce_within_the_fsdp_group_then_the_shard_across_it():
    colls, params, per_device, _ = compile_for((2, 4, 1))
    # First a reduce-scatter inside each fsdp group (one node), then the data axis all-reduces only the
    # shard each device keeps: the links between groups carry 1/fsdp of the gradient.
    inside = moved(colls, "all-reduce", group=4) + moved(colls, "reduce-scatter", group=4)
    across = moved(colls, "all-reduce", group=2)
    assert 0.95 * params <= inside <= SLACK * params, inside / params
    assert 0.95 * per_device <= across <= SLACK * per_device, across / per_device


def test_gradient_reduced_every_micro_batch_keeps_fsdp_memory():
    # train.gradient_reduction=per_micro_batch: inside each fsdp group the backward pass reduce-scatters every
    # micro-batch's gradient (the tied embedding once per use: two lookups and the output projection), so no
    # device holds the whole float32 gradient; the data axis still all-reduces the shard once per step.
    layout, table = (2, 4, 1), MODEL.vocab_size * MODEL.d_model * 4
    colls, params, per_device, _, temp = _compile(layout, SHAPE.micro_batches, "per_micro_batch")
    inside = moved(colls, "all-reduce", group=4) + moved(colls, "reduce-scatter", group=4)
    expect = SHAPE.micro_batches * (params + 2 * table)
    assert 0.95 * expect <= inside <= SLACK * expect, inside / expect
    across = moved(colls, "all-reduce", group=2)
    assert 0.95 * per_device <= across <= SLACK * per_device, across / per_device
    # Against the step that reduces once per step: at least a third of the float32 gradient less memory.
    per_step_temp = _compile(layout, SHAPE.micro_batches, "per_step")[4]
    assert temp <= per_step_temp - params / 3, (temp / params, per_step_temp / params)


def test_tensor_parallel_reduces_activations_per_layer_and_the_gradient_once():
    colls, params, per_device, _ = compile_for((2, 1, 4))
    # The gradient of each device's tensor slice is all-reduced over the data axis once per step.
    across = moved(colls, "all-reduce", group=2)
    assert 0.95 * per_device <= across <= SLACK * per_device, across / per_device
    # Forward, per micro-batch, Megatron-style: one all-reduce of the [rows, length, d_model] activations
    # after each row-parallel projection (encoder: attention out_proj, fc2; decoder: self- and
    # cross-attention out_proj, fc2) and after each vocabulary-parallel embedding lookup (encoder, decoder).
    rows = SHAPE.batch // 2 // SHAPE.micro_batches
    activation = rows * SHAPE.source_length * MODEL.d_model * 4
    forward = [c for c in colls if c["op"] == "all-reduce" and c["group"] == 4 and "transpose(" not in c["op_name"]
               and c["bytes"] >= activation]
    expect = SHAPE.micro_batches * (LAYERS * 2 + LAYERS * 3 + 2)
    assert sum(c["bytes"] * c["count"] for c in forward) == expect * activation, \
        [(c["op_name"][-60:], c["bytes"], c["count"]) for c in forward]


def test_tensor_parallel_activation_reductions_match_megatron():
    colls, _, _, _ = compile_for((2, 1, 4))
    rows = SHAPE.batch // 2 // SHAPE.micro_batches
    activation = rows * SHAPE.source_length * MODEL.d_model * 4
    # Per micro-batch: forward as above (2 per encoder layer, 3 per decoder layer, 2 lookups); backward one
    # per column-parallel block input (encoder: q/k/v, fc1; decoder: self q/k/v, cross q, fc1, and cross
    # k/v on the encoder output) and one for the output projection's input.
    megatron = SHAPE.micro_batches * (LAYERS * (2 + 3) + 2 + LAYERS * (2 + 4) + 1) * activation
    tensor = moved(colls, "all-reduce", group=4, big=activation)
    assert tensor <= SLACK * megatron, tensor / megatron
