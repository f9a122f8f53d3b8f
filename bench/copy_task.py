"""Stability probe: a tiny BART trained on a random-token copy task at a high learning rate
without clipping, with `final_logits_bias` frozen (the default, as Hugging Face's buffer) and trained
(what bart_jax did before), same seeds, same batches.

    python bench/copy_task.py [--steps 1500] [--seeds 0] [--modes frozen,trained] [--out bench/out/copy_task.json]
    PYTHONPATH=. REFERENCE_PYTHON bench/copy_task.py --impl torch [--seeds 0,1,2]   # the PyTorch peer

--impl torch trains Hugging Face's PyTorch BartForConditionalGeneration (same config, torch's own init per
seed, `final_logits_bias` a frozen buffer there: mode "frozen") on the same batches with torch.optim.AdamW
and the same weight-decay mask (kernels and embedding tables), in the python that has torch + transformers
(REFERENCE_PYTHON above: any interpreter with torch, transformers and jax; PYTHONPATH=. lets it import
bart_jax's presets from the checkout).

Model: preset tiny (d 64, 2+2 layers, 4 heads, ffn 128, vocab 512), dropout 0. Batches: 16 rows of
`<s> w1..w62 </s>` (--ragged: n in 8..62, right-padded to 64; ids in [4, 511)), target = source. AdamW lr 3e-3,
constant, no warmup, no clipping, weight decay 0.01, eps as --eps. Prints per run the loss every
--every steps, the step at which it learned to copy (loss < 0.1), the largest loss after that, the first
later step with loss > 1.0 (copying lost: a divergence) and the final loss, and writes everything as JSON.
CPU heavy: one run of 1500 steps is minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def batches(vocab: int, batch: int, length: int, seed: int, ragged: bool = False):
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        # ragged rows (8..62 tokens): neither implementation learned to copy them in 1,000 steps (seed 0)
        n = rng.integers(8, length - 1, size=batch) if ragged else np.full(batch, length - 2)
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
    losses, t0, bias_absmax = (train_torch if args.impl == "torch" else train_jax)(mode, seed, args)
    # Learned: the first step with loss < 0.1 (copying; ln 508 ~ 6.2 before). Lost: a later step with loss > 1.0,
    # i.e. the model stopped copying (relative rules misfire on spikes from 0.002 to 0.005).
    learned = next((i + 1 for i, loss in enumerate(losses) if loss < 0.1), None)
    after = losses[learned:] if learned else []
    lost = next((learned + 1 + i for i, loss in enumerate(after) if not math.isfinite(loss) or loss > 1.0), None)
    return {"impl": args.impl, "mode": mode, "seed": seed, "eps": args.eps, "lr": args.lr, "losses": losses,
            "min_loss": min(losses), "final_loss": losses[-1], "learned_at": learned, "lost_at": lost,
            "max_loss_after_learning": max(after) if after else None,
            "seconds": time.perf_counter() - t0, "final_logits_bias_absmax": bias_absmax}


def train_torch(mode: str, seed: int, args):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from bart_jax import preset

    del mode  # HF keeps final_logits_bias as a frozen buffer
    torch.set_num_threads(1)  # a tiny model: threads only add hand-offs
    torch.manual_seed(seed)
    config = preset("tiny", dropout=0.0).to_hf_config()
    model = BartForConditionalGeneration(BartConfig(**config)).train()
    # bart_jax's weight-decay mask in PyTorch names: Linear weights and embedding tables, not LayerNorm or biases
    decayed, others = [], []
    for name, param in model.named_parameters():
        is_norm = "layer_norm" in name or "layernorm" in name
        (decayed if name.endswith(".weight") and not is_norm else others).append(param)
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}],
                            lr=args.lr, eps=args.eps)
    data = batches(config["vocab_size"], 16, 64, seed, args.ragged)
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        b = {k: torch.from_numpy(v).long() for k, v in next(data).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       decoder_input_ids=b["decoder_input_ids"],
                       decoder_attention_mask=b["decoder_attention_mask"]).logits
        labels = b["labels"].masked_fill(b["labels"] == config["pad_token_id"], -100)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (i + 1) % args.every == 0:
            print(f"  torch seed {seed} step {i + 1}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return losses, t0, float(model.final_logits_bias.abs().max())


def train_jax(mode: str, seed: int, args):
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
    data = batches(model.vocab_size, 16, 64, seed, args.ragged)
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, jax.device_put(next(data), partitioning.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
        if (i + 1) % args.every == 0:
            print(f"  {mode} seed {seed} step {i + 1}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    bias = jax.device_get(state.params["final_logits_bias"])
    return losses, t0, float(abs(bias).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="jax", choices=("jax", "torch"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ragged", action="store_true", help="rows of 8..62 tokens (default: every row full)")
    parser.add_argument("--seeds", default="0", help="comma list")
    parser.add_argument("--modes", default="frozen,trained", help="frozen and/or trained (final_logits_bias)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon (PyTorch's default 1e-8)")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", default=os.path.join("bench", "out", "copy_task.json"))
    args = parser.parse_args(argv)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        modes = [m for m in args.modes.split(",") if m] if args.impl == "jax" else ["frozen"]
        for mode in modes:
            rows.append(run(mode, seed, args))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f)
    print(f"{'impl':<6} {'mode':<8} {'seed':>4} {'learned at':>10} {'max loss after':>14} {'lost at':>7} "
          f"{'final':>7} {'|bias| max':>10} {'s':>6}")
    for r in rows:
        peak = r["max_loss_after_learning"]
        print(f"{r['impl']:<6} {r['mode']:<8} {r['seed']:>4} {r['learned_at'] or '-':>10} "
              f"{'-' if peak is None else format(peak, '.3f'):>14} {r['lost_at'] or '-':>7} {r['final_loss']:>7.4f} "
              f"{r['final_logits_bias_absmax']:>10.3f} {r['seconds']:>6.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
