"""Forward+backward throughput of the BART model (default: bart-base shape on this machine's CPU).

Prints a table and writes JSON. MFU = model FLOPs (bart_jax.train.flops.train_step_flops) per second over
the device's peak (bart_jax.train.flops.device_peak: a GPU's datasheet figure, on CPU a matmul measured
in this run, labelled "measured matmul").

    python bench/forward.py [--preset bart-base] [--batch 4] [--src 512] [--tgt 128] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax import Bart, init_params, preset
from bart_jax.model import param_count
from bart_jax.train import flops as flops_lib


def timed(fn, *args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_step_time(preset_name: str = "bart-base", batch: int = 4, src: int = 512, tgt: int = 128,
                    dtype: str = "float32", repeats: int = 3, vocab_size: int | None = None) -> dict:
    """Time one jitted forward+backward (token cross-entropy) of a BART preset on random tokens.

    The one train-step timer of the benchmarks (bench/noise.py and bench/data.py compare against it).
    Returns {'config', 'params', 'compile_s', 'step_s' (median of `repeats`), 'tokens' (batch x (src + tgt))}.
    """
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    cfg = preset(preset_name, dtype=dtype, dropout=0.0, **overrides)
    params = init_params(cfg)
    model = Bart(cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, src)), jnp.int32)
    dec = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, tgt)), jnp.int32)
    mask, dmask = jnp.ones_like(ids), jnp.ones_like(dec)

    def loss(p):
        logits = model.apply({"params": p}, ids, mask, dec, dmask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), dec[..., None], -1))

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    compile_s = time.perf_counter() - t0
    return {"config": cfg, "params": param_count(params), "compile_s": compile_s,
            "step_s": timed(compiled, params, repeats=repeats), "tokens": batch * (src + tgt)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bart-base")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--src", type=int, default=512)
    ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/forward.json")
    args = ap.parse_args(argv)

    step = train_step_time(args.preset, args.batch, args.src, args.tgt, args.dtype, args.repeats)
    cfg, compile_s, step_s = step["config"], step["compile_s"], step["step_s"]
    flops = flops_lib.train_step_flops(cfg, args.batch, args.src, args.tgt)
    peak = flops_lib.device_peak(cfg.compute_dtype)
    tokens = step["tokens"]
    row = {
        "preset": args.preset, "params": step["params"], "dtype": args.dtype, "batch": args.batch,
        "src_len": args.src, "tgt_len": args.tgt, "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "model_gflop_per_s": round(flops / step_s / 1e9, 2), "peak_gflop_per_s": round(peak.flops_per_s / 1e9, 2),
        "peak_source": peak.source, "mfu": round(flops / step_s / peak.flops_per_s, 3),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {jax.devices()[0].platform}",
        "jax": jax.__version__,
    }
    width = max(len(k) for k in row)
    print("forward+backward benchmark")
    for k, v in row.items():
        print(f"  {k:<{width}}  {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
