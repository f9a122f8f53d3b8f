"""Noising throughput: jit-compiled bart_jax.noise vs the per-example numpy transcription of fairseq,
and noising time as a fraction of one bart-base train step (forward+backward) on the same machine.

    python bench/noise.py [--batch 64] [--length 512] [--presets bart_large,...] [--train-batch 2]

Rows are synthetic SentencePiece-like documents: 3 in 4 tokens begin a word, a sentence end every ~25
tokens, a quarter of the rows shorter than the batch length. Times are the best of several rounds
(this machine is shared); each round times the kernel over many calls and the reference over one
batch, interleaved, so their ratio is measured under the same load. The train step runs at a small
batch of full-length rows (source and target length = --length) and is scaled per token to the
benchmark batch, since a 64x512 step would take minutes on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import noise_reference as R  # noqa: E402

from bart_jax.noise import NOISE_PRESETS, noise_key, noise_preset, noise_tokens  # noqa: E402

TARGET_SPEEDUP = 10.0
TARGET_FRACTION = 0.05


def make_batch(rng, batch: int, length: int, vocab: int):
    word_starts = rng.random(vocab) < 0.75
    word_starts[:R.FIRST_WORD_ID] = False
    tokens = R.make_rows(rng, batch, length, vocab, min_len=length // 2, end_rate=0.04, full_rate=0.75)
    return tokens, word_starts


def time_kernel(fn, keys) -> float:
    out = None
    start = time.perf_counter()
    for key in keys:
        out = fn(key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / len(keys)


def bench_preset(name, tokens, word_starts, rounds: int, calls: int):
    cfg = noise_preset(name, sentence_end_ids=(R.FULL_STOP, R.BANG), mask_id=R.MASK)
    tokens_j, word_starts_j = jnp.asarray(tokens), jnp.asarray(word_starts)
    fn = jax.jit(lambda key: noise_tokens(key, tokens_j, word_starts_j, cfg))
    keys = [noise_key(0, step) for step in range(calls)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(keys[0]))
    compile_s = time.perf_counter() - t0
    draws = R.NumpyDraws(np.random.default_rng(0), cfg, len(word_starts))
    kernel, reference = [], []
    for _ in range(rounds):
        kernel.append(time_kernel(fn, keys))
        t0 = time.perf_counter()
        R.reference_batch(tokens, word_starts, cfg, lambda b: draws)
        reference.append(time.perf_counter() - t0)
    return {"kernel_s": min(kernel), "kernel_median_s": float(np.median(kernel)),
            "reference_s": min(reference), "reference_median_s": float(np.median(reference)),
            "compile_s": compile_s}


def bench_train_step(batch: int, length: int, vocab: int, repeats: int):
    """Seconds of one jitted bart-base forward+backward at [batch, length] source and target."""
    from forward import train_step_time  # bench/forward.py, this script's directory

    return train_step_time("bart-base", batch, length, length, repeats=repeats, vocab_size=vocab)["step_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--presets", default=",".join(NOISE_PRESETS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--train-batch", type=int, default=2, help="batch of the timed train step (0: skip)")
    ap.add_argument("--train-repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/noise.json")
    args = ap.parse_args(argv)

    tokens, word_starts = make_batch(np.random.default_rng(0), args.batch, args.length, args.vocab)
    batch_tokens = args.batch * args.length
    results = {}
    for name in args.presets.split(","):
        results[name] = bench_preset(name, tokens, word_starts, args.rounds, args.calls)

    step_s = per_batch_step_s = None
    if args.train_batch > 0:
        step_s = bench_train_step(args.train_batch, args.length, args.vocab, args.train_repeats)
        if step_s is not None:
            per_batch_step_s = step_s * args.batch / args.train_batch

    header = f"{'preset':20s} {'jit ms':>8s} {'jit tok/s':>11s} {'numpy ms':>9s} {'numpy tok/s':>11s} " \
             f"{'speedup':>8s} {'of step':>9s}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"noise on {args.batch}x{args.length} rows, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores (load average {load:.1f}), jax {jax.__version__} ({jax.default_backend()})")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        r["kernel_tokens_per_s"] = batch_tokens / r["kernel_s"]
        r["reference_tokens_per_s"] = batch_tokens / r["reference_s"]
        r["speedup"] = r["reference_s"] / r["kernel_s"]
        r["fraction_of_train_step"] = r["kernel_s"] / per_batch_step_s if per_batch_step_s else None
        fraction = f"{100 * r['fraction_of_train_step']:7.1e}%" if per_batch_step_s else f"{'n/a':>8s}"
        print(f"{name:20s} {1e3 * r['kernel_s']:8.2f} {r['kernel_tokens_per_s']:11.3g} "
              f"{1e3 * r['reference_s']:9.2f} {r['reference_tokens_per_s']:11.3g} {r['speedup']:7.1f}x {fraction}")
    if per_batch_step_s:
        print(f"bart-base train step (fwd+bwd, float32): {step_s:.2f} s at {args.train_batch}x{args.length} "
              f"(source and target), scaled per token to {per_batch_step_s:.1f} s per {args.batch}x{args.length}")
    else:
        print("bart-base train step: n/a")
    main_preset = "bart_large" if "bart_large" in results else next(iter(results))
    r = results[main_preset]
    verdict = {"preset": main_preset, "speedup": r["speedup"], "speedup_target": TARGET_SPEEDUP,
               "speedup_met": r["speedup"] >= TARGET_SPEEDUP,
               "fraction_of_train_step": r["fraction_of_train_step"], "fraction_target": TARGET_FRACTION,
               "fraction_met": (r["fraction_of_train_step"] < TARGET_FRACTION
                                if r["fraction_of_train_step"] is not None else None)}
    print(f"targets ({main_preset}): speedup {r['speedup']:.1f}x (>= {TARGET_SPEEDUP:.0f}x: "
          f"{'met' if verdict['speedup_met'] else 'NOT met'}); fraction of a train step "
          + (f"{100 * r['fraction_of_train_step']:.1e}% (< {100 * TARGET_FRACTION:.0f}%: "
             f"{'met' if verdict['fraction_met'] else 'NOT met'})" if per_batch_step_s else "n/a"))

    report = {"machine": {"processor": platform.processor(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count(), "load_average": load, "jax": jax.__version__,
                          "backend": jax.default_backend()},
              "batch": args.batch, "length": args.length, "vocab": args.vocab, "rounds": args.rounds,
              "calls": args.calls, "presets": results,
              "train_step": {"batch": args.train_batch, "length": args.length, "seconds": step_s,
                             "scaled_seconds_per_batch": per_batch_step_s},
              "targets": verdict}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
