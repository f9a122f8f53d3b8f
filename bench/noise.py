"""Noising time per batch and its share of one bart-base train step (forward+backward) on this machine,
optionally against the noise package of an older git revision timed in the same run.

    python bench/noise.py [--batch 8] [--length 512] [--presets bart_large,...] [--baseline-rev 46a66ce]
                          [--train-batch 8]

Rows are synthetic SentencePiece-like documents: 3 in 4 tokens begin a word, a sentence end every ~25
tokens, a quarter of the rows shorter than the batch length. Each round times every implementation over
many calls, interleaved, so their ratio is measured under the same load; the table shows the best round
(this machine is shared). The train step is `bench/forward.py`'s timer at --train-batch full-length rows
(source and target length = --length), scaled per token to the benchmark batch when the two differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import noise_reference as R  # noqa: E402

import bart_jax.noise as current_noise  # noqa: E402

MAX_FRACTION = 0.01  # the bar: the noise may cost at most 1% of a bart-base train step
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_batch(rng, batch: int, length: int, vocab: int):
    word_starts = rng.random(vocab) < 0.75
    word_starts[:R.FIRST_WORD_ID] = False
    tokens = R.make_rows(rng, batch, length, vocab, min_len=length // 2, end_rate=0.04, full_rate=0.75)
    return tokens, word_starts


def load_noise_package(rev: str):
    """bart_jax.noise as of git revision `rev`, imported beside the current package (which stays in place)."""
    names = subprocess.run(["git", "-C", REPO, "ls-tree", "--name-only", rev, "bart_jax/noise/"],
                           check=True, capture_output=True, text=True).stdout.split()
    directory = os.path.join(tempfile.mkdtemp(prefix="noise_"), "noise")
    os.makedirs(directory)
    for path in names:
        source = subprocess.run(["git", "-C", REPO, "show", f"{rev}:{path}"], check=True, capture_output=True).stdout
        with open(os.path.join(directory, os.path.basename(path)), "wb") as f:
            f.write(source)
    # The old modules import each other as bart_jax.noise.*: give them that name while they load.
    current = {k: v for k, v in sys.modules.items() if k == "bart_jax.noise" or k.startswith("bart_jax.noise.")}
    for k in current:
        del sys.modules[k]
    try:
        spec = importlib.util.spec_from_file_location("bart_jax.noise", os.path.join(directory, "__init__.py"),
                                                      submodule_search_locations=[directory])
        package = importlib.util.module_from_spec(spec)
        sys.modules["bart_jax.noise"] = package
        spec.loader.exec_module(package)
        return package
    finally:
        for k in [k for k in sys.modules if k == "bart_jax.noise" or k.startswith("bart_jax.noise.")]:
            del sys.modules[k]
        sys.modules.update(current)


def time_calls(fn, keys) -> float:
    out = None
    start = time.perf_counter()
    for key in keys:
        out = fn(key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / len(keys)


def bench_preset(name: str, packages: dict, tokens, word_starts, rounds: int, calls: int) -> dict:
    """{implementation: {'s': best seconds per call, 'median_s', 'compile_s'}} for preset `name`."""
    fns, keys, out = {}, None, {}
    for label, package in packages.items():
        cfg = package.noise_preset(name, sentence_end_ids=(R.FULL_STOP, R.BANG), mask_id=R.MASK)
        tokens_j, word_starts_j = jax.numpy.asarray(tokens), jax.numpy.asarray(word_starts)
        fns[label] = jax.jit(lambda key, p=package, c=cfg: p.noise_tokens(key, tokens_j, word_starts_j, c))
        keys = [package.noise_key(0, step) for step in range(calls)]
        t0 = time.perf_counter()
        jax.block_until_ready(fns[label](keys[0]))
        out[label] = {"compile_s": time.perf_counter() - t0}
    times = {label: [] for label in packages}
    for _ in range(rounds):
        for label, fn in fns.items():
            times[label].append(time_calls(fn, keys))
    for label in packages:
        out[label].update(s=min(times[label]), median_s=float(np.median(times[label])))
    return out


def bench_train_step(batch: int, length: int, vocab: int, repeats: int) -> float:
    """Seconds of one jitted bart-base forward+backward at [batch, length] source and target."""
    from forward import train_step_time  # bench/forward.py, this script's directory

    return train_step_time("bart-base", batch, length, length, repeats=repeats, vocab_size=vocab)["step_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--presets", default=",".join(current_noise.NOISE_PRESETS))
    ap.add_argument("--baseline-rev", default=None, help="git revision whose bart_jax/noise is timed alongside")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--train-batch", type=int, default=8, help="batch of the timed train step (0: skip)")
    ap.add_argument("--train-repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/noise.json")
    args = ap.parse_args(argv)

    packages = {"current": current_noise}
    if args.baseline_rev:
        packages[args.baseline_rev] = load_noise_package(args.baseline_rev)
    tokens, word_starts = make_batch(np.random.default_rng(0), args.batch, args.length, args.vocab)
    load_before = os.getloadavg()[0]
    results = {name: bench_preset(name, packages, tokens, word_starts, args.rounds, args.calls)
               for name in args.presets.split(",")}
    step_s = per_batch_step_s = None
    if args.train_batch > 0:
        step_s = bench_train_step(args.train_batch, args.length, args.vocab, args.train_repeats)
        per_batch_step_s = step_s * args.batch / args.train_batch
    load_after = os.getloadavg()[0]

    print(f"noise on {args.batch}x{args.length} rows, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores (load average {load_before:.1f} -> {load_after:.1f}), "
          f"jax {jax.__version__} ({jax.default_backend()})")
    print(f"{'preset':20s} " + " ".join(f"{label + ' ms':>16s} {'of step':>9s}" for label in packages))
    for name, r in results.items():
        cells = []
        for label in packages:
            if per_batch_step_s:
                r[label]["fraction_of_train_step"] = r[label]["s"] / per_batch_step_s
            fraction = r[label].get("fraction_of_train_step")
            cells.append(f"{1e3 * r[label]['s']:16.3f} " + (f"{100 * fraction:8.5f}%" if fraction else f"{'n/a':>9s}"))
        print(f"{name:20s} " + " ".join(cells))
    if per_batch_step_s:
        print(f"bart-base train step (fwd+bwd, float32): {step_s:.2f} s at {args.train_batch}x{args.length} "
              f"(source and target), {per_batch_step_s:.2f} s per {args.batch}x{args.length}")
        worst = max(r["current"]["fraction_of_train_step"] for r in results.values())
        print(f"largest share of a train step (current): {100 * worst:.5f}% "
              f"({'under' if worst < MAX_FRACTION else 'NOT under'} {100 * MAX_FRACTION:.0f}%)")

    report = {"machine": {"processor": platform.processor(), "machine": platform.machine(),
                          "cpu_count": os.cpu_count(), "load_average": [load_before, load_after],
                          "jax": jax.__version__, "backend": jax.default_backend()},
              "batch": args.batch, "length": args.length, "vocab": args.vocab, "rounds": args.rounds,
              "calls": args.calls, "baseline_rev": args.baseline_rev, "presets": results,
              "train_step": {"batch": args.train_batch, "length": args.length, "seconds": step_s,
                             "scaled_seconds_per_batch": per_batch_step_s}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
