"""What the multi-process agreements of the training loop cost per step, on two local processes (gloo CPU
collectives, 4 simulated devices each).

    python bench/stop_vote.py [--steps 200] [--out bench/out/stop_vote.json]

Rows: the stop vote as the loop takes it at every step boundary (`StopVote.at_boundary`: queue this boundary's
vote, read the previous one), a blocking vote (`StopVote.now`, what the end of a stage takes once), and the
fine-tuning batch-shape agreement of every step across processes (`same_shape_everywhere`), each the mean wall
time per call over --steps calls with nothing else running (so each call waits for its collective); then a
stand-in train step (data-parallel matmuls, loss read one step late as the loop does) without and with the
lagged vote, per step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(process_id: int, port: int, steps: int, out: str) -> None:
    import jax
    import numpy as np

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from bart_jax.train.distributed import StopRequest, StopVote
    from bart_jax.train.loop import same_shape_everywhere

    vote = StopVote(StopRequest())
    batch = {"input_ids": np.ones((4, 32 + 32 * process_id), np.int32),
             "attention_mask": np.ones((4, 32 + 32 * process_id), np.int32),
             "decoder_input_ids": np.ones((4, 16), np.int32), "decoder_attention_mask": np.ones((4, 16), np.int32),
             "labels": np.ones((4, 16), np.int32)}
    rows = {}
    for name, fn in (("stop vote per step boundary (lagged)", vote.at_boundary),
                     ("stop vote, blocking", vote.now),
                     ("fine-tuning batch shape agreement", lambda: same_shape_everywhere(batch, 1))):
        for _ in range(5):  # compile and warm up
            fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        rows[name] = (time.perf_counter() - t0) / steps * 1e3
    rows.update(_in_a_loop(vote, steps))
    if process_id == 0:
        with open(out, "w") as f:
            json.dump({"processes": 2, "devices_per_process": 4, "steps": steps, "ms_per_call": rows}, f, indent=1)
    jax.distributed.shutdown()


def _in_a_loop(vote, steps: int) -> dict[str, float]:
    """Per-step time of a stand-in train step (a data-parallel matmul whose gradient-like sum crosses the
    processes, its loss read one step late as the loop reads it) without and with the lagged stop vote."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()), ("all",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("all")),
                                               np.ones((4 * jax.local_device_count(), 512), np.float32))
    w = jax.device_put(np.full((512, 512), 1e-3, np.float32), NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def step(w, x):
        loss = jnp.mean(jnp.tanh(x @ w) @ w)
        return w - 1e-3 * jnp.mean(x.T @ jnp.tanh(x @ w), axis=0, keepdims=True), loss

    out = {}
    for name, with_vote in (("stand-in step alone", False), ("stand-in step + lagged stop vote", True)):
        pending = None
        for i in range(steps + 5):
            if i == 5:
                t0 = time.perf_counter()
            if with_vote:
                vote.at_boundary()
            w, loss = step(w, x)
            if pending is not None:
                float(pending.addressable_data(0))
            pending = loss
        float(pending.addressable_data(0))
        out[name] = (time.perf_counter() - t0) / steps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join("bench", "out", "stop_vote.json"))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.port, args.steps, args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--port", str(port), "--steps",
                               str(args.steps), "--out", args.out], env=env) for i in range(2)]
    if any(p.wait() for p in procs):
        sys.exit("a worker failed")
    with open(args.out) as f:
        result = json.load(f)
    print(f"{'agreement (2 processes x 4 CPU devices, gloo)':<48}{'ms per call':>12}")
    for name, ms in result["ms_per_call"].items():
        print(f"{name:<48}{ms:>12.3f}")
    print(f"(mean of {result['steps']} calls; written to {args.out})")


if __name__ == "__main__":
    main()
