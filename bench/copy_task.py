"""Stability probe (issue #11): a tiny BART trained on a random-token copy task at a high learning rate
without clipping, with `final_logits_bias` frozen (the default, as Hugging Face's buffer) and trained
(what bart_jax did before), same seeds, same batches.

    python bench/copy_task.py [--steps 1500] [--seeds 0] [--modes frozen,trained] [--out bench/out/copy_task.json]

Model: preset tiny (d 64, 2+2 layers, 4 heads, ffn 128, vocab 512), dropout 0. Batches: 16 rows of
`<s> w1..wn </s>` (n in 8..62, right-padded to 64, ids in [4, 511)), target = source. AdamW lr 3e-3,
constant, no warmup, no clipping, weight decay 0.01, eps as --eps. Prints per run the loss every
--every steps, the minimum, the final loss and the first step whose loss is more than 2x the best so far
after step 200 (a divergence), and writes everything as JSON. CPU heavy: one run of 1500 steps is minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def batches(vocab: int, batch: int, length: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        n = rng.integers(8, length - 1, size=batch)
        ids = np.full((batch, length), 1, np.int32)
        for i, k in enumerate(n):
            ids[i, 0], ids[i, k + 1] = 0, 2
            ids[i, 1:k + 1] = rng.integers(4, vocab - 1, size=k)
        dec = np.full_like(ids, 1)
        dec[:, 0] = 2
        dec[:, 1:] = ids[:, :-1]
        yield dict(input_ids=ids, attention_mask=(ids != 1).astype(np.int32), decoder_input_ids=dec,
                   decoder_attention_mask=(dec != 1).astype(np.int32), labels=ids)


def run(mode: str, seed: int, args) -> dict:
    import jax

    from bart_jax import preset
    from bart_jax.model import param_logical_axes
    from bart_jax.train import config as C
    from bart_jax.train import optim, partitioning
    from bart_jax.train.state import abstract_params, create_train_state
    from bart_jax.train.step import compile_train_step, make_train_step

    # "trained" restores the old behaviour: nothing frozen (read by make_optimizer and the train step).
    optim.FROZEN_LEAF_NAMES = ("final_logits_bias",) if mode == "frozen" else ()
    model = preset("tiny", dropout=0.0)
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    opt_cfg = C.OptimizerConfig(name="adamw", learning_rate=args.lr, eps=args.eps, weight_decay=0.01, clip_norm=0.0)
    optimizer, schedule = optim.make_optimizer(opt_cfg, C.ScheduleConfig(decay="constant"), args.steps,
                                               abstract_params(model), param_logical_axes(model))
    state, shardings = create_train_state(model, optimizer, mesh, seed=seed)
    step = compile_train_step(make_train_step(model, optimizer, schedule, label_smoothing=0.0), shardings, mesh)
    data = batches(model.vocab_size, 16, 64, seed)
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, jax.device_put(next(data), partitioning.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
        if (i + 1) % args.every == 0:
            print(f"  {mode} seed {seed} step {i + 1}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    best, diverged = math.inf, None
    for i, loss in enumerate(losses):
        if i >= 200 and diverged is None and (not math.isfinite(loss) or loss > 2 * best):
            diverged = i + 1
        best = min(best, loss) if math.isfinite(loss) else best
    bias = jax.device_get(state.params["final_logits_bias"])
    return {"mode": mode, "seed": seed, "eps": args.eps, "lr": args.lr, "losses": losses, "min_loss": best,
            "final_loss": losses[-1], "first_divergence_step": diverged, "seconds": time.perf_counter() - t0,
            "final_logits_bias_absmax": float(abs(bias).max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0", help="comma list")
    parser.add_argument("--modes", default="frozen,trained", help="frozen and/or trained (final_logits_bias)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon (PyTorch's default 1e-8)")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", default=os.path.join("bench", "out", "copy_task.json"))
    args = parser.parse_args(argv)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for mode in [m for m in args.modes.split(",") if m]:
            rows.append(run(mode, seed, args))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f)
    print(f"{'mode':<8} {'seed':>4} {'min loss':>9} {'final':>9} {'diverged at':>11} {'|bias| max':>10} {'s':>6}")
    for r in rows:
        div = r["first_divergence_step"] or "-"
        print(f"{r['mode']:<8} {r['seed']:>4} {r['min_loss']:>9.4f} {r['final_loss']:>9.4f} {div:>11} "
              f"{r['final_logits_bias_absmax']:>10.3f} {r['seconds']:>6.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
