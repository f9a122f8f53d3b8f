"""One process of the two-process (multi-host) training test, and the shared training recipe.

Run as `python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON CKPT_DIR` with
XLA_FLAGS=--xla_force_host_platform_device_count=4: joins the job on 127.0.0.1:PORT (gloo CPU collectives),
trains a few steps on a (2, 2, 2) mesh over both processes' devices, each process feeding only its own
rows of every global batch, saves and restores a checkpoint (with each process's own grain iterator
position), and (process 0) writes the losses to OUT_JSON.
"""

import json
import sys

MESH = (2, 2, 2)
STEPS = 3
GLOBAL_BATCH = 8


def global_batches(model, steps=STEPS, batch=GLOBAL_BATCH, length=16):
    """The same global batches in every process (each process then keeps only its rows)."""
    from toy_batches import padded_batches  # this script's directory

    return padded_batches(model.vocab_size, steps, batch, length, seed=200)


def train(mesh_shape=MESH, ckpt_dir=None):
    """Train STEPS steps on the mesh over all devices of all processes; returns (losses, restored_ok, the
    position each process's data iterator is restored to, in process order)."""
    import grain
    import jax
    import numpy as np

    from bart_jax import preset
    from bart_jax.data import to_global_batch
    from bart_jax.model import param_logical_axes
    from bart_jax.train import config as C
    from bart_jax.train import optim, partitioning
    from bart_jax.train.checkpoint import Checkpointer
    from bart_jax.train.state import abstract_params, create_train_state, state_shardings
    from bart_jax.train.step import compile_train_step, make_train_step

    model = preset("tiny", dropout=0.1, vocab_size=128, max_position_embeddings=32)
    mesh = partitioning.make_mesh(C.MeshConfig(*mesh_shape))
    optimizer, schedule = optim.make_optimizer(
        C.OptimizerConfig(name="lamb", learning_rate=1e-2), C.ScheduleConfig(warmup_steps=1), 10,
        abstract_params(model), param_logical_axes(model))
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = compile_train_step(make_train_step(model, optimizer, schedule, grad_shardings=shardings.params),
                              shardings, mesh)
    sharding = partitioning.batch_sharding(mesh)
    per_process = GLOBAL_BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    losses = []
    for batch in global_batches(model):
        local = {k: v[rows] for k, v in batch.items()}  # this process's own data shard
        state, metrics = step(state, to_global_batch(local, sharding))
        losses.append(float(metrics["loss"]))
    restored_ok, positions = None, None
    if ckpt_dir is not None:
        from jax.experimental import multihost_utils

        # Each process's own data stream (100 * process index + n), STEPS items into it.
        def stream():
            start = 100 * jax.process_index()
            return iter(grain.MapDataset.range(start, start + 50).to_iter_dataset())

        batches = stream()
        for _ in range(STEPS):
            next(batches)
        ckpt = Checkpointer(ckpt_dir)
        ckpt.save(state, config={"test": True}, data_iterator=batches)
        ckpt.wait()
        _, abstract = state_shardings(model, optimizer, mesh)
        fresh = stream()
        restored, _ = ckpt.restore(STEPS, abstract, shardings, data_iterator=fresh)
        ckpt.close()
        same = jax.tree.map(lambda a, b: bool((a == b).all()), restored.params, state.params)
        restored_ok = all(jax.tree.leaves(same))
        positions = [int(p) for p in multihost_utils.process_allgather(np.int32(next(fresh)))]
    return losses, restored_ok, positions


def main(argv):
    process_id, num_processes, port, out_path, ckpt_dir = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    losses, restored_ok, positions = train(ckpt_dir=ckpt_dir)
    if process_id == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "restored_ok": restored_ok, "data_positions": positions,
                       "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
