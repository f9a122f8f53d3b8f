"""Checkpoints: keep last N + best, restore onto another mesh, atomic saves, exact resume of a killed
run, and fine-tuning initialised from a bart_jax or Hugging Face checkpoint."""

import os
import subprocess
import sys
import textwrap

import chex
import grain
import jax
import numpy as np
import pytest

from bart_jax import preset
from bart_jax.model import param_logical_axes
from bart_jax.train import config as C
from bart_jax.train import optim, partitioning
from bart_jax.train.checkpoint import Checkpointer, read_checkpoint_config, restore_params
from bart_jax.train.state import abstract_params, create_train_state, state_shardings
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = preset("tiny", vocab_size=128, max_position_embeddings=32)


def _optimizer():
    return optim.make_optimizer(C.OptimizerConfig(name="lamb"), C.ScheduleConfig(), 10,
                                abstract_params(MODEL), param_logical_axes(MODEL))[0]


def test_keep_last_and_best_and_restore_onto_smaller_mesh(tmp_path):
    optimizer = _optimizer()
    state, _ = create_train_state(MODEL, optimizer, partitioning.make_mesh(C.MeshConfig(2, 2, 2)), seed=3)
    ckpt = Checkpointer(tmp_path, C.CheckpointConfig(keep=2, keep_best=1))
    batches = iter(grain.MapDataset.range(100).to_iter_dataset())
    for i, loss in enumerate([5.0, 1.0, 3.0, 4.0]):
        state = state.replace(step=state.step + 1)
        assert next(batches) == i
        ckpt.save(state, config={"run": "x"}, data_iterator=batches, metrics={"eval_loss": loss})
    assert next(batches) == 4  # moving on after a save does not move the saved position
    ckpt.wait()
    assert [n for n in os.listdir(tmp_path / "4" / "data") if n.startswith("process")] == ["process_0-of-1.json"]
    assert ckpt.all_steps() == [2, 3, 4]  # last two + the best (step 2, eval_loss 1.0)
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 4

    # Saved on 8 devices as (2, 2, 2); restored on 2 devices.
    small = partitioning.make_mesh(C.MeshConfig(1, 2, 1), devices=jax.devices()[:2])  # fsdp over 2
    shardings, abstract = state_shardings(MODEL, optimizer, small)
    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    restored, config = ckpt.restore(4, abstract, shardings, data_iterator=fresh)
    ckpt.close()
    assert next(fresh) == 4 and config == {"run": "x"} and int(restored.step) == 4
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(state.params))
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    emb = restored.params["shared"]["embedding"]
    assert emb.sharding.mesh.devices.size == 2 and emb.addressable_shards[0].data.shape == (128, 32)

    # Parameters alone (how fine-tuning starts from a pretraining run with another optimizer).
    params = restore_params(tmp_path, abstract.params, shardings.params)  # best step: 2
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(state.params))


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, jax, jax.numpy as jnp
    from bart_jax.train.checkpoint import Checkpointer
    from bart_jax.train.state import TrainState
    def state(step):
        params = {"w": jnp.full((2048, 2048), float(step)), "v": jnp.full((4096, 1024), float(step))}
        return TrainState(step=jnp.int32(step), updates=jnp.int32(step), params=params, opt_state=(),
                          rng=jax.random.PRNGKey(0),
                          nonfinite_streak=jnp.int32(0), nonfinite_total=jnp.int32(0))
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(state(1), config={})
    ckpt.wait()
    ckpt.save(state(2), config={})  # asynchronous: returns before the write ends
    os._exit(9)  # crash mid-save
""")


def test_crash_mid_save_leaves_no_valid_looking_checkpoint(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-3000:]
    # Step 2 was cut short: at most a temporary directory, never a finalized step "2".
    assert not os.path.exists(tmp_path / "2")
    ckpt = Checkpointer(tmp_path)  # a new run over the same directory
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    abstract = jax.eval_shape(lambda: {"w": np.zeros((2048, 2048), np.float32),
                                       "v": np.zeros((4096, 1024), np.float32)})
    restored = restore_params(tmp_path, abstract, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(
        jax.devices()[0]), abstract))
    assert float(restored["w"][0, 0]) == 1.0 and float(restored["v"][-1, -1]) == 1.0
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1"]  # the partial write is cleaned up


# ------------------------------------------------------------------------------------------ loop level
def _tiny_run_args(workdir, **extra):
    args = [f"workdir={workdir}", "model.vocab_size=512", "pretrain.train.steps=4", "pretrain.train.batch_size=8",
            "pretrain.train.source_length=32", "pretrain.train.eval_every=0", "pretrain.train.checkpoint_every=2",
            "pretrain.train.progress_bar=false", "pretrain.train.peak_flops_per_device=1e9",
            "checkpoint.async_save=true"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from bart_jax.data import builtin_documents, train_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(builtin_documents()["train"][:200], 512, directory)
    return str(directory)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_dir):
    from bart_jax.train.loop import pretrain

    workdir = tmp_path_factory.mktemp("uninterrupted")
    cfg = C.load_config("tiny", _tiny_run_args(workdir) + [
        f"data.tokenizer={tokenizer_dir}"])
    return cfg, pretrain(cfg)


@pytest.mark.integration
def test_resume_after_kill_continues_exactly(tmp_path, uninterrupted, tokenizer_dir):
    """A run killed after step 3 leaves only its checkpoints (the last at step 2; crash-safety of the save
    itself is tested above). Restarting from them repeats steps 3-4 of the uninterrupted run bit for bit:
    dropout PRNG, noise keys, data-iterator position and optimizer state are all restored."""
    import shutil

    from bart_jax.train.loop import pretrain

    ref_cfg, ref = uninterrupted
    assert ref.final_step == 4 and len(ref.losses) == 4 and ref.model_dir and os.path.isdir(ref.model_dir)
    cfg = C.load_config("tiny", _tiny_run_args(tmp_path) + [
        f"data.tokenizer={tokenizer_dir}"])
    # What the killed run left behind: the step-2 checkpoint (steps 3.. were lost with the process).
    shutil.copytree(os.path.join(ref.checkpoint_dir, "2"), tmp_path / "pretrain" / "checkpoints" / "2")
    resumed = pretrain(cfg)
    assert resumed.resumed_from == 2 and resumed.final_step == 4
    assert resumed.losses == ref.losses[2:]  # bitwise equal
    ref_params = restore_params(ref.checkpoint_dir, *_param_targets(ref.model_config))
    new_params = restore_params(resumed.checkpoint_dir, *_param_targets(resumed.model_config))
    chex.assert_trees_all_equal(jax.device_get(new_params), jax.device_get(ref_params))


@pytest.mark.integration
def test_preempted_run_resumes_with_same_losses(tmp_path, uninterrupted, tokenizer_dir):
    """The run itself stops after step 3 without a final checkpoint (what preemption leaves: the step-2
    checkpoint); the same call again resumes there and its losses equal the uninterrupted run's exactly."""
    from bart_jax.train.loop import pretrain

    _, ref = uninterrupted
    cfg = C.load_config("tiny", _tiny_run_args(tmp_path) + [
        f"data.tokenizer={tokenizer_dir}"])
    first = pretrain(cfg, stop_at_step=3)
    assert first.final_step == 3 and first.model_dir is None
    assert first.losses == ref.losses[:3]
    second = pretrain(cfg)
    assert second.resumed_from == 2 and second.final_step == 4
    assert second.losses == ref.losses[2:]  # bitwise equal, data position and RNG restored


def _param_targets(model):
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    shapes = abstract_params(model)
    return shapes, partitioning.logical_to_shardings(param_logical_axes(model), shapes, mesh)


@pytest.mark.integration
def test_finetune_from_pretraining_run(uninterrupted, tokenizer_dir):
    """Fine-tuning starts from the pretraining run's parameters (not its LAMB state) and trains on pairs."""
    from bart_jax.train.loop import finetune
    from bart_jax.train.resume import model_config_and_init

    cfg, ref = uninterrupted
    cfg = C.apply_overrides(cfg, ["finetune.init_from=run:pretrain", "finetune.train.steps=2",
                                  "finetune.train.batch_size=8", "finetune.train.source_length=32",
                                  "finetune.train.target_length=16", "finetune.train.eval_every=2",
                                  "finetune.train.eval_batches=1", "finetune.train.progress_bar=false",
                                  "finetune.train.peak_flops_per_device=1e9", "model.dropout=0.0"])
    model_config, init = model_config_and_init(cfg, "finetune")
    assert model_config == ref.model_config.replace(dropout=0.0)
    init_params = init(*_param_targets(model_config))
    chex.assert_trees_all_equal(jax.device_get(init_params),
                                jax.device_get(restore_params(ref.checkpoint_dir, *_param_targets(model_config))))
    stored = read_checkpoint_config(ref.checkpoint_dir)
    assert stored["stage"] == "pretrain" and stored["run"]["pretrain"]["train"]["steps"] == 4

    result = finetune(cfg)
    assert result.final_step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert set(result.eval_metrics) >= {"eval_loss", "eval_nll", "eval_accuracy"}
    assert result.best_step == 2 and os.path.isdir(result.model_dir)
    from bart_jax import from_pretrained

    config, params = from_pretrained(result.model_dir)
    assert config == model_config


def test_finetune_init_from_hugging_face_dir(tmp_path):
    from bart_jax import from_pretrained
    from bart_jax.train.resume import model_config_and_init

    hf_dir = os.path.join(ROOT, "tests", "fixtures", "bart_default")
    cfg = C.load_config(None, [f"workdir={tmp_path}", f"finetune.init_from={hf_dir}", "model.dropout=0.0",
                               "model.dtype=bfloat16"])
    model_config, init = model_config_and_init(cfg, "finetune")
    assert model_config.d_model == 32 and model_config.vocab_size == 128
    assert model_config.dropout == 0.0 and model_config.dtype == "bfloat16"
    params = init(*_param_targets(model_config))
    _, expected = from_pretrained(hf_dir)
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(expected))
    bad = C.apply_overrides(cfg, ["model.d_model=64"])
    with pytest.raises(ValueError, match="d_model.*conflicts"):
        model_config_and_init(bad, "finetune")
