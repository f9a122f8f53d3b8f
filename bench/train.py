"""Training throughput and MFU of the bart_jax train step, with a PyTorch (Hugging Face) reference.

    python bench/train.py [--shapes tiny,bart-base] [--dtypes float32,bfloat16] [--out bench/out/train.json]

For each model shape and compute dtype: one jitted train step (AdamW, label smoothing 0.1, dropout 0.1,
fp32 master weights) on one device, timed over several steps after compilation. MFU = model FLOPs per
step (bart_jax.train.flops: 6 x matmul FLOPs of the forward pass) / step time / the matmul FLOP/s measured
here, in the same run, in the same dtype. If /work/refvenv/bin/python (or --torch-python) has torch +
transformers, the same model and batch are trained with BartForConditionalGeneration + torch.optim.AdamW
(bf16 via CPU autocast) and the throughput ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Shapes: (preset, batch, length) with source length = target length = length.
SHAPES = {"tiny": ("tiny", 16, 128), "bart-base": ("bart-base", 4, 128), "bart-large": ("bart-large", 2, 128)}

TORCH_SCRIPT = r"""
import json, os, sys, time
import torch
from transformers import BartConfig, BartForConditionalGeneration
cfg_json, batch, length, dtype, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
model = BartForConditionalGeneration(BartConfig(**json.loads(cfg_json)))
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
g = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size
ids = torch.randint(4, vocab, (batch, length), generator=g)
labels = torch.randint(4, vocab, (batch, length), generator=g)
mask = torch.ones_like(ids)
loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        loss = loss_fn(logits.float().view(-1, vocab), labels.view(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
for _ in range(warmup):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t) / steps
print(json.dumps({"step_s": dt, "tokens_per_s": batch * 2 * length / dt}))
"""


def hf_config(config) -> dict:
    hf = config.to_hf_config()
    for k in ("architectures", "model_type", "is_encoder_decoder", "use_cache"):
        hf.pop(k, None)
    return hf


def bench_jax(name: str, dtype: str, steps: int, warmup: int, batch: int | None = None,
              source_length: int | None = None, target_length: int | None = None) -> dict:
    """Time the jitted train step of shape `name` (batch and lengths overridable; target defaults to source)."""
    import jax
    import numpy as np

    from bart_jax import preset
    from bart_jax.model import param_logical_axes, shift_tokens_right
    from bart_jax.train import config as C
    from bart_jax.train import flops, optim, partitioning
    from bart_jax.train.state import abstract_params, create_train_state
    from bart_jax.train.step import compile_train_step, make_train_step

    preset_name, default_batch, length = SHAPES[name]
    batch = batch or default_batch
    source = source_length or length
    target = target_length or source
    model = preset(preset_name, dtype=dtype, param_dtype="float32", dropout=0.1)
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer, schedule = optim.make_optimizer(
        C.OptimizerConfig(name="adamw", learning_rate=1e-4, clip_norm=0.0), C.ScheduleConfig(decay="constant"),
        1000, abstract_params(model), param_logical_axes(model))
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = compile_train_step(make_train_step(model, optimizer, schedule, label_smoothing=0.1), shardings, mesh)
    rng = np.random.RandomState(0)
    ids = rng.randint(4, model.vocab_size, (batch, source)).astype(np.int32)
    labels = rng.randint(4, model.vocab_size, (batch, target)).astype(np.int32)
    dec = np.asarray(shift_tokens_right(labels, model.pad_token_id, model.decoder_start_token_id))
    data = jax.device_put(dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=dec,
                               decoder_attention_mask=np.ones_like(dec), labels=labels),
                          partitioning.batch_sharding(mesh))
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    step_flops = flops.train_step_flops(model, batch, source, target)
    return {"shape": name, "dtype": dtype, "batch": batch, "length": source, "target_length": target,
            "step_s": step_s, "warmup_s": compile_s, "tokens_per_s": batch * (source + target) / step_s,
            "model_flops_per_step": step_flops,
            "model_flops_per_s": step_flops / step_s, "loss": float(metrics["loss"]), "config": hf_config(model)}


def bench_torch(python: str, result: dict, steps: int, warmup: int) -> dict | None:
    try:
        out = subprocess.run([python, "-c", TORCH_SCRIPT, json.dumps(result["config"]), str(result["batch"]),
                              str(result["length"]), result["dtype"], str(steps), str(warmup)],
                             capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"torch reference failed: {e}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"torch reference failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,bart-base", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    parser.add_argument("--torch-python", default="/work/refvenv/bin/python",
                        help="python with torch + transformers for the reference ('' to skip)")
    parser.add_argument("--out", default=os.path.join("bench", "out", "train.json"))
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from bart_jax.train.flops import measure_matmul_flops

    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; expected some of {sorted(SHAPES)}")
    device = jax.devices()[0]
    peaks = {d: measure_matmul_flops(getattr(jnp, d), size=2048, seconds=1.0) for d in dtypes}
    use_torch = bool(args.torch_python) and os.path.exists(args.torch_python)
    rows = []
    for name in shapes:
        for dtype in dtypes:
            r = bench_jax(name, dtype, args.steps, args.warmup)
            r["matmul_peak_flops"] = peaks[dtype]
            r["mfu"] = r["model_flops_per_s"] / peaks[dtype]
            ref = bench_torch(args.torch_python, r, args.steps, args.warmup) if use_torch else None
            r["torch"] = ref
            r["speedup_vs_torch"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
            rows.append(r)
            print(f"done {name} {dtype}: {r['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    header = (f"{'shape':<10} {'dtype':<9} {'B x L':>8} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{'peak TF/s':>9} {'MFU':>6} {'torch tok/s':>11} {'vs torch':>8}")
    print(f"device: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores; "
          "tokens = source + target positions; MFU vs matmul peak measured in this run")
    print(header)
    print("-" * len(header))
    for r in rows:
        t = r["torch"]
        torch_tps = f"{t['tokens_per_s']:.0f}" if t else "n/a"
        ratio = f"{r['speedup_vs_torch']:.2f}x" if t else "n/a"
        print(f"{r['shape']:<10} {r['dtype']:<9} {r['batch']:>3}x{r['length']:<4} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>10.0f} {r['model_flops_per_s'] / 1e12:>8.3f} "
              f"{r['matmul_peak_flops'] / 1e12:>9.3f} {100 * r['mfu']:>5.1f}% {torch_tps:>11} {ratio:>8}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(device.device_kind), "platform": device.platform, "cpu_count": os.cpu_count(),
                   "matmul_peak_flops": peaks, "results": [{k: v for k, v in r.items() if k != "config"}
                                                           for r in rows]}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
