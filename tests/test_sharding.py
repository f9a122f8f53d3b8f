"""Meshes over 8 simulated CPU devices: same losses as one device, parameters sharded as the rules say."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bart_jax import preset
from bart_jax.model import param_logical_axes
from bart_jax.train import config as C
from bart_jax.train import optim, partitioning
from bart_jax.train.state import abstract_params, create_train_state
from bart_jax.train.step import compile_train_step, make_train_step
from toy_batches import padded_batches

MODEL = preset("tiny", dropout=0.0, vocab_size=128, max_position_embeddings=32)
STEPS = 3


def batches(n=STEPS, batch=8, length=16):
    return padded_batches(MODEL.vocab_size, n, batch, length, seed=100)


def train(mesh, **step_options):
    optimizer, schedule = optim.make_optimizer(
        C.OptimizerConfig(name="lamb", learning_rate=1e-2, clip_norm=1.0), C.ScheduleConfig(warmup_steps=1),
        10, abstract_params(MODEL), param_logical_axes(MODEL))
    state, shardings = create_train_state(MODEL, optimizer, mesh, seed=0)
    step = compile_train_step(make_train_step(MODEL, optimizer, schedule, grad_shardings=shardings.params,
                                              **step_options), shardings, mesh)
    losses = []
    for b in batches():
        state, m = step(state, jax.device_put(b, partitioning.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
    return losses, state, shardings


@pytest.fixture(scope="module")
def single_device():
    return train(partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1]))


def test_gradient_reduced_every_micro_batch_matches_single_device(single_device):
    # train.gradient_reduction=per_micro_batch: each fsdp group reduce-scatters every micro-batch's gradient
    # in the backward pass, the data axis reduces once per step; the step's update is the same.
    ref_losses, ref_state, _ = single_device
    losses, state, _ = train(partitioning.make_mesh(C.MeshConfig(2, 2, 2)), micro_batches=2,
                             gradient_reduction="per_micro_batch")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_matches_single_device(shape, single_device):
    assert jax.device_count() == 8
    ref_losses, ref_state, _ = single_device
    losses, state, shardings = train(partitioning.make_mesh(C.MeshConfig(*shape)))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert losses[-1] != losses[0]  # it trained
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=1e-5)

    # Parameters (and the optimizer moments that mirror them) really are sharded by the rules.
    d, f, t = shape
    expect = {
        ("shared", "embedding"): (P("tensor", "fsdp"), (MODEL.vocab_size // t, MODEL.d_model // f)),
        ("encoder", "layers", "ffn", "fc1", "kernel"): (P(None, "fsdp", "tensor"), (2, 64 // f, 128 // t)),
        ("decoder", "layers", "self_attn", "q_proj", "kernel"): (P(None, "fsdp", "tensor", None), (2, 64 // f, 4 // t, 16)),
        ("decoder", "layers", "encoder_attn", "out_proj", "kernel"): (P(None, "tensor", None, "fsdp"), (2, 4 // t, 16, 64 // f)),
        ("final_logits_bias",): (P("tensor"), (MODEL.vocab_size // t,)),
        ("encoder", "layers", "final_layer_norm", "scale"): (P(None, None), (2, 64)),
    }
    adam_mu = state.opt_state[1].mu  # chain: (clip, adam, decay, trust ratio, lr)
    for path, (spec, local_shape) in expect.items():
        leaf, mu = state.params, adam_mu
        for k in path:
            leaf, mu = leaf[k], mu[k]
        assert partitioning._fits(leaf.sharding.spec, leaf.shape, leaf.sharding.mesh) == \
            partitioning._fits(spec, leaf.shape, leaf.sharding.mesh), path
        assert leaf.addressable_shards[0].data.shape == local_shape, path
        if path == ("final_logits_bias",):
            assert isinstance(mu, optax.MaskedNode), path  # frozen: no optimizer state to shard
        else:
            assert mu.sharding == leaf.sharding, path
    # the batch is split over data x fsdp
    assert partitioning.batch_sharding(state.params["final_logits_bias"].sharding.mesh).spec == P(("data", "fsdp"))


def test_mesh_shape_fill_and_errors():
    assert partitioning.mesh_shape(C.MeshConfig(-1, 2, 1), 8) == (4, 2, 1)
    assert partitioning.mesh_shape(C.MeshConfig(1, 2, -1), 8) == (1, 2, 4)
    with pytest.raises(ValueError, match="needs 3 devices"):
        partitioning.mesh_shape(C.MeshConfig(3, 1, 1), 8)
    with pytest.raises(ValueError, match="do not divide"):
        partitioning.mesh_shape(C.MeshConfig(-1, 3, 1), 8)
    mesh = partitioning.make_mesh(C.MeshConfig(2, 2, 2))
    with pytest.raises(ValueError, match="divisible by micro_batches"):
        partitioning.check_batch_divisible(6, 1, mesh)


def test_indivisible_dimension_is_replicated_with_one_warning_naming_it(caplog):
    mesh = partitioning.make_mesh(C.MeshConfig(1, 2, 4))
    logical = {"attn": {"w6": P("embed", "heads")}, "b": P("vocab")}
    shapes = {"attn": {"w6": jax.ShapeDtypeStruct((64, 6), jnp.float32)}, "b": jax.ShapeDtypeStruct((100,), jnp.float32)}
    with caplog.at_level("WARNING", logger="bart_jax.train.partitioning"):
        sh = partitioning.logical_to_shardings(logical, shapes, mesh)
        again = partitioning.logical_to_shardings(logical, shapes, mesh)  # e.g. the optimizer's copy
    assert sh["attn"]["w6"].spec == again["attn"]["w6"].spec == P("fsdp", None)  # 6 heads do not split over 4
    assert sh["b"].spec == P("tensor")  # 100 = 4 x 25
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("attn/w6: dimension 1 (size 6)"), warnings
