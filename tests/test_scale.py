"""The pod-scale properties bench/scale.py tabulates, pinned at tiny size on 8 simulated devices (the
compiled train step, not a model of it), and the bf16 mixed-precision policy of the train step lowered
for CUDA on this machine (no GPU needed to lower)."""

import math

import jax
import numpy as np
import pytest

from bart_jax import preset
from bart_jax.train import aot, partitioning
from bart_jax.train import config as C

# bf16 compute / fp32 master weights, as pretraining runs; heads, mlp and the vocabulary divide by 4.
MODEL = preset("tiny", dropout=0.0, vocab_size=128, max_position_embeddings=32, dtype="bfloat16",
               param_dtype="float32")
SHAPE = aot.StepShape(batch=16, source_length=16, target_length=16, micro_batches=2)
LAYERS = MODEL.encoder_layers  # = decoder_layers


def compile_for(layout):
    mesh = partitioning.make_mesh(C.MeshConfig(*layout))
    lowered, _, abstract = aot.lower_train_step(MODEL, mesh, SHAPE)
    compiled = lowered.compile()
    return compiled, abstract, aot.collectives(compiled.as_text(), 8)


@pytest.fixture(scope="module")
def fsdp8():
    return compile_for((1, 8, 1))


@pytest.fixture(scope="module")
def tensor4():
    return compile_for((2, 1, 4))


def leaf(tree, *path):
    for k in path:
        tree = tree[k]
    return tree


def test_fsdp_shards_parameters_and_optimizer_state(fsdp8):
    compiled, abstract, _ = fsdp8
    state_sh = compiled.input_shardings[0][0]  # what the executable takes, not what we asked for
    held = 0
    for name in ("params", "opt_state"):
        sh, ab = getattr(state_sh, name), getattr(abstract, name)
        total = aot.global_bytes(ab)
        # Only LayerNorm parameters ('norm') and scalars are replicated: the padding of the 1/N rule.
        replicated = sum(math.prod(x.shape) * x.dtype.itemsize for s, x in zip(jax.tree.leaves(sh), jax.tree.leaves(ab))
                         if s.shard_shape(x.shape) == x.shape)
        assert replicated < 0.02 * total, name
        per_device = aot.per_device_bytes(sh, ab)
        assert total / 8 <= per_device <= total / 8 + replicated, (name, per_device, total)
        held += per_device
    # every 'embed' dimension is split 8 ways, in the parameters and in Adam's moments
    mu = state_sh.opt_state[1].mu
    for path in [("shared", "embedding"), ("encoder", "layers", "ffn", "fc1", "kernel"),
                 ("decoder", "layers", "encoder_attn", "out_proj", "kernel")]:
        shape = leaf(abstract.params, *path).shape
        embed_dim = 1 if path[-2:] != ("out_proj", "kernel") else 3
        for tree in (state_sh.params, mu):
            local = leaf(tree, *path).shard_shape(shape)
            assert local[embed_dim] == shape[embed_dim] // 8, path
    # XLA's own buffer assignment agrees: the step's arguments are those shards, the batch's 1/8 and scalars.
    batch = aot.global_bytes(aot.abstract_batch(SHAPE)) / 8
    assert held <= compiled.memory_analysis().argument_size_in_bytes <= held + batch + 256


def test_tensor_splits_attention_heads_and_mlp(tensor4):
    compiled, abstract, _ = tensor4
    state_sh = compiled.input_shardings[0][0]
    heads, ffn = MODEL.encoder_attention_heads, MODEL.encoder_ffn_dim
    d, head_dim = MODEL.d_model, MODEL.d_model // heads
    expect = {  # [layers, ...] local shapes with tensor = 4 (fsdp = 1)
        ("encoder", "layers", "self_attn", "q_proj", "kernel"): (LAYERS, d, heads // 4, head_dim),
        ("decoder", "layers", "encoder_attn", "k_proj", "kernel"): (LAYERS, d, heads // 4, head_dim),
        ("decoder", "layers", "self_attn", "out_proj", "kernel"): (LAYERS, heads // 4, head_dim, d),
        ("encoder", "layers", "ffn", "fc1", "kernel"): (LAYERS, d, ffn // 4),
        ("decoder", "layers", "ffn", "fc2", "kernel"): (LAYERS, ffn // 4, d),
        ("decoder", "layers", "ffn", "fc1", "bias"): (LAYERS, ffn // 4),
        ("shared", "embedding"): (MODEL.vocab_size // 4, d),
    }
    for path, local in expect.items():
        shape = leaf(abstract.params, *path).shape
        assert leaf(state_sh.params, *path).shard_shape(shape) == local, path
        assert leaf(state_sh.opt_state[1].nu, *path).shard_shape(shape) == local, path


def test_fsdp_step_gathers_weights_per_layer_and_not_in_the_update(fsdp8):
    _, abstract, colls = fsdp8
    param_bytes = aot.global_bytes(abstract.params)
    gathers = [c for c in colls if c["op"] == "all-gather"]
    # The stacked layers' weights are gathered inside the layer scan, once per layer per micro-batch pass.
    in_loop = {c["op_name"].rsplit("/", 2)[-2] for c in gathers if c["count"] == SHAPE.micro_batches * LAYERS}
    # (Attention.project stacks the q/k/v kernels: one gather for the three.)
    assert {"project", "fc1", "fc2"} <= {n.split(".")[-1] for n in in_loop}, in_loop
    # Every sizeable all-gather belongs to the model's forward or backward pass ...
    big = [c for c in gathers if c["bytes"] > 0.001 * param_bytes]
    assert big and all("Bart" in c["op_name"] for c in big), [c["op_name"] for c in big if "Bart" not in c["op_name"]]
    # ... and all of them together move the weights at least once and at most twice (forward, backward)
    # per micro-batch: FSDP-8 gathers the 7/8 it does not hold.
    gathered = sum(c["traffic"] * c["count"] for c in gathers)
    once = SHAPE.micro_batches * param_bytes * 7 / 8
    assert once <= gathered <= 2.05 * once, (gathered, once)
    # Gradients are reduced across the 8 devices once per step, after accumulation (XLA:CPU emits
    # all-reduce where XLA:GPU would emit a reduce-scatter): the parameter bytes, once.
    reduced = sum(c["bytes"] * c["count"] for c in colls if c["op"] in ("all-reduce", "reduce-scatter")
                  and c["group"] == 8)
    assert 0.95 * param_bytes <= reduced <= 1.1 * param_bytes, (reduced, param_bytes)
    # The optimizer update (LAMB after accumulation) only all-reduces norms: nothing parameter-sized.
    update = [c for c in colls if "Bart" not in c["op_name"] and "jvp" not in c["op_name"]
              and "sum_gradients" not in c["op_name"]]
    assert update and all(c["op"] == "all-reduce" and c["bytes"] < 0.01 * param_bytes for c in update), update


def test_tensor_step_all_reduces_activations_within_the_tensor_group(tensor4):
    compiled, abstract, colls = tensor4
    param_bytes = aot.global_bytes(abstract.params)
    per_device = aot.per_device_bytes(compiled.input_shardings[0][0].params, abstract.params)
    # Megatron-style: the row-parallel projections (attention out_proj, fc2) end in an all-reduce over
    # the 4 tensor devices inside the layer loop.
    tensor_ar = [c for c in colls if c["op"] == "all-reduce" and c["group"] == 4
                 and c["count"] == SHAPE.micro_batches * LAYERS]
    names = " ".join(c["op_name"] for c in tensor_ar)
    assert "out_proj" in names and "fc2" in names, names
    # No parameter is gathered (each device keeps its heads/hidden slice) ...
    assert sum(c["bytes"] for c in colls if c["op"] == "all-gather") < 0.01 * param_bytes
    # ... and gradients are all-reduced over the data axis only (groups of 2), once per step.
    data_ar = sum(c["bytes"] * c["count"] for c in colls if c["op"] == "all-reduce" and c["group"] == 2)
    assert 0.95 * per_device <= data_ar <= 1.1 * per_device, (data_ar, per_device)


@pytest.fixture(scope="module")
def cuda_lowering():
    """The train step lowered for CUDA from this CPU-only machine (StableHLO with op-name locations)."""
    from bart_jax.train.state import state_shardings
    from bart_jax.train.step import compile_train_step, make_train_step

    # The per-backend attention default resolves by the backend traced on (this CPU): pin the GPU's path.
    model = MODEL.replace(attention_implementation="xla")
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer, schedule = aot.lamb(model)
    shardings, abstract = state_shardings(model, optimizer, mesh)
    step = compile_train_step(make_train_step(model, optimizer, schedule, micro_batches=2,
                                              grad_shardings=shardings.params), shardings, mesh)
    lowered = step.trace(abstract, aot.abstract_batch(aot.StepShape(4, 16, 16, 2))).lower(
        lowering_platforms=("cuda",))
    return lowered, aot.stablehlo_ops(lowered.as_text(debug_info=True))


def test_bf16_policy_of_the_cuda_train_step(cuda_lowering):
    lowered, ops = cuda_lowering
    # fp32 master weights and LAMB state, in and out of the step
    state_in = lowered.args_info[0][0]
    state_out = lowered.out_info[0]
    for tree in (state_in.params, state_in.opt_state, state_out.params, state_out.opt_state):
        dtypes = {str(x.dtype) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)}
        assert dtypes == {"float32"}, dtypes

    dots = [o for o in ops if o["op"] == "dot_general"]
    assert len(dots) > 40
    # Every forward matmul multiplies bf16 by bf16. Those that feed a softmax (attention scores, the LM
    # head's logits) return f32.
    bf16 = [o for o in dots if o["operands"] == ["bf16", "bf16"]]
    assert all(o["result"] == "f32" for o in bf16 if "_logits" in o["name"] or "->BNTS" in o["name"])
    assert any(o["result"] == "f32" for o in bf16 if "_logits" in o["name"])
    # The only matmuls with an f32 operand are the backward of those two f32-output products (their
    # f32 cotangent); every projection and feed-forward matmul, forward and backward, is bf16.
    f32 = [o for o in dots if "f32" in o["operands"]]
    assert all("Bart._logits" in o["name"] or "->BNTS" in o["name"] for o in f32), \
        [o["name"] for o in f32 if "Bart._logits" not in o["name"] and "->BNTS" not in o["name"]]
    # (q, k and v: one matmul, Attention.project, against their stacked kernels.)
    for scope in ("_attn.project/", "/out_proj/", "/fc1/", "/fc2/"):
        mine = [o for o in dots if scope in o["name"]]
        assert len(mine) >= 3 and all(o["operands"] == ["bf16", "bf16"] for o in mine), scope

    reduces = [o for o in ops if o["op"] == "reduce"]
    # LayerNorm statistics (forward and backward) in f32
    norms = [o for o in reduces if "layer_norm" in o["name"] or "layernorm" in o["name"]]
    assert len(norms) > 10 and all(o["operands"][0] == "f32" for o in norms)
    # attention softmax (max and sum over keys) in f32
    softmax = [o for o in reduces if ".attend/" in o["name"] and o["name"].endswith(("reduce_max", "reduce_sum"))
               and "proj" not in o["name"]]
    assert len(softmax) >= 6 and all(o["operands"][0] == "f32" for o in softmax)
    # the loss: log-sum-exp over the vocabulary and the token sums, in f32
    loss = [o for o in reduces if o["name"].startswith("vmap(jvp())/")]  # vmapped over the batch shards
    assert loss and all(o["operands"][0] in ("f32", "i32") for o in loss)
