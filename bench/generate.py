"""Beam-search generation speed: bart_jax vs Hugging Face transformers (PyTorch) on the same machine.

CPU table: bart-base shape with random weights, source length 512, 64 new tokens with
min_length = max_length so every system generates exactly the same number of tokens, beams 4 and 6,
batch 1 and 8. bart_jax's compile time is reported separately (AOT lower + compile); run times are the
best of --repeats calls after a warm-up (the minimum is the most robust to other load on a shared machine),
and each case runs bart_jax then HF back to back so both see the same machine state. 'scan ms/tok' is the
same generation with the scan-over-layers cached decoder (`generate(..., scan_decoder=True)`), which slices
every layer's weights out of the stacked arrays at every step. If --hf-python names an interpreter with
torch + transformers (it runs as a subprocess, so this project never imports torch), HF `generate` runs
the same configuration and the table shows the speed ratio measured in the same run.

On a GPU it also runs the XSum shape (bart-large, source 1024, beam 6, batch 32, bfloat16, max_length 62)
and compares with NVIDIA's published 17.7 sequences/s on A100 (DeepLearningExamples BART, FP16/AMP).

    python bench/generate.py [--hf-python /path/to/python] [--out bench/out/generate.json] [--quick]
                             [--preset bart-base] [--source 512] [--decode-layout auto|bnhs|bsnh]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

NEW_TOKENS = 64
SOURCE_LENGTH = 512
NVIDIA_A100_XSUM_SEQ_PER_S = 17.7

# Runs inside the HF interpreter: same architecture, random weights, same inputs and controls.
HF_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
config = BartConfig(**spec["hf_config"])
model = BartForConditionalGeneration(config).eval()
model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2)
results = []
for case in spec["cases"]:
    ids = torch.from_numpy(np.random.default_rng(0).integers(4, config.vocab_size, size=(case["batch"], case["source"])))
    ids[:, 0], ids[:, -1] = 0, 2
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=case["num_beams"],
              max_length=case["max_length"], min_length=case["max_length"], no_repeat_ngram_size=case["ngram"],
              length_penalty=1.0, early_stopping=True, forced_bos_token_id=None, forced_eos_token_id=None,
              do_sample=False, use_cache=True)
    with torch.inference_mode():
        # Warm-up on a 2-token generation (full-length warm-ups double HF's already long batch-8 runs).
        model.generate(**dict(kw, max_length=3, min_length=3))
        times = []
        for _ in range(case["repeats"]):
            t = time.perf_counter(); out = model.generate(**kw); times.append(time.perf_counter() - t)
            assert out.shape[1] == case["max_length"], out.shape
    results.append(dict(case, seconds=min(times)))
print("HF_RESULTS " + json.dumps(results))
"""


def hf_config_dict(config) -> dict:
    keys = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")
    return {k: getattr(config, k) for k in keys} | {"dropout": 0.0, "attention_dropout": 0.0,
                                                    "activation_dropout": 0.0, "forced_eos_token_id": None}


def run_bart_jax(config, params, case: dict, scan_decoder: bool = False) -> dict:
    """Compile (timed), warm up, then the best of `repeats` timed calls of one generate program
    (the default unrolled cached decoder, or the scan over stacked layers with scan_decoder)."""
    import jax

    from bart_jax.decode.generate import generate_ids, resolve_controls

    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, size=(case["batch"], case["source"])).astype(np.int32)
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    mask = np.ones_like(ids)
    controls = resolve_controls(config, num_beams=case["num_beams"], max_length=case["max_length"],
                                min_length=case["max_length"], no_repeat_ngram_size=case["ngram"],
                                length_penalty=1.0, early_stopping=True, forced_bos_token_id=None,
                                forced_eos_token_id=None)
    controls = controls.replace(num_return_sequences=controls.num_beams)  # as `generate` compiles beam search
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    compiled = generate_ids.lower(config, params, ids, mask, controls, key, scan_decoder=scan_decoder).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(params, ids, mask, controls, key))
    # min_length = max_length: every returned hypothesis has exactly NEW_TOKENS generated tokens.
    assert (np.asarray(out.sequences[:, 0]) != config.pad_token_id).all(), "a hypothesis ended early"
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, ids, mask, controls, key))
        times.append(time.perf_counter() - start)
    return dict(case, compile_seconds=compile_s, seconds=min(times))


def run_hf(hf_python: str, config, cases: list[dict], threads: int) -> list[dict] | None:
    spec = dict(hf_config=hf_config_dict(config), cases=cases, threads=threads)
    proc = subprocess.run([hf_python, "-c", HF_SCRIPT, json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("HF_RESULTS "):
            return json.loads(line[len("HF_RESULTS "):])
    print(f"Hugging Face run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "generate.json"))
    parser.add_argument("--hf-python", default=None,
                        help="python with torch + transformers for the HF comparison (default: this one if it has them)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 1 only (a slow CPU)")
    parser.add_argument("--ngram", type=int, default=0, help="no_repeat_ngram_size for every case (presets use 3)")
    parser.add_argument("--preset", default="bart-base", help="model shape (bart_jax.config presets)")
    parser.add_argument("--source", type=int, default=SOURCE_LENGTH, help="source length")
    parser.add_argument("--decode-layout", default="auto", help="BartConfig.decode_layout: auto, bnhs or bsnh")
    parser.add_argument("--no-scan", action="store_true",
                        help="skip the scan-over-layers decoder column (generate(..., scan_decoder=True))")
    args = parser.parse_args(argv)

    import importlib.util

    import jax

    from bart_jax import init_params, preset

    hf_python = args.hf_python
    if hf_python is None and importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        hf_python = sys.executable
    backend = jax.default_backend()
    threads = os.cpu_count() or 1
    config = preset(args.preset, dropout=0.0, decode_layout=args.decode_layout)
    params = init_params(config, jax.random.PRNGKey(0))
    batches = (1,) if args.quick else (1, 8)
    cases = [dict(num_beams=k, batch=b, source=args.source, max_length=NEW_TOKENS + 1, ngram=args.ngram,
                  repeats=args.repeats) for k in (4, 6) for b in batches]
    rows, hf = [], [] if hf_python and backend == "cpu" else None
    for case in cases:  # interleaved, so a change in background load hits both systems alike
        rows.append(run_bart_jax(config, params, case))
        if not args.no_scan:
            rows[-1]["scan_decoder_seconds"] = run_bart_jax(config, params, case, scan_decoder=True)["seconds"]
        if hf is not None:
            result = run_hf(hf_python, config, [case], threads)
            hf = None if result is None else hf + result

    print(f"\n{args.preset} shape, random weights, source {args.source}, {NEW_TOKENS} new tokens "
          f"(min_length = max_length), no_repeat_ngram_size {args.ngram}, decode layout "
          f"{config.decode_layout_for()}, backend {backend}, {threads} CPU threads")
    header = f"{'beams':>5} {'batch':>5} | {'compile s':>9} {'seq/s':>8} {'ms/token':>9}"
    header += "" if args.no_scan else f" {'scan ms/tok':>11}"
    header += f" | {'HF seq/s':>8} {'HF ms/tok':>9} {'speed-up':>8}" if hf else ""
    print(header)
    print("-" * len(header))
    for i, row in enumerate(rows):
        row["sequences_per_s"] = row["batch"] / row["seconds"]
        row["ms_per_token"] = 1000 * row["seconds"] / NEW_TOKENS
        line = (f"{row['num_beams']:>5} {row['batch']:>5} | {row['compile_seconds']:>9.1f} "
                f"{row['sequences_per_s']:>8.2f} {row['ms_per_token']:>9.1f}")
        if "scan_decoder_seconds" in row:
            line += f" {1000 * row['scan_decoder_seconds'] / NEW_TOKENS:>11.1f}"
        if hf:
            h = hf[i]
            row["hf_seconds"] = h["seconds"]
            row["hf_sequences_per_s"] = h["batch"] / h["seconds"]
            row["speedup_vs_hf"] = h["seconds"] / row["seconds"]
            line += (f" | {row['hf_sequences_per_s']:>8.2f} {1000 * h['seconds'] / NEW_TOKENS:>9.1f} "
                     f"{row['speedup_vs_hf']:>7.2f}x")
        print(line)

    report = dict(backend=backend, devices=[str(d) for d in jax.devices()], cpu_threads=threads,
                  model=f"{args.preset} shape (random weights)", source_length=args.source, new_tokens=NEW_TOKENS,
                  decode_layout=config.decode_layout_for(),
                  rows=rows, hf_python=hf_python if hf else None)
    if backend == "gpu":
        large = preset("bart-large", dropout=0.0, dtype="bfloat16", param_dtype="bfloat16")
        large_params = init_params(large, jax.random.PRNGKey(0))
        xsum = run_bart_jax(large, large_params, dict(num_beams=6, batch=32, source=1024, max_length=62, ngram=3,
                                                      repeats=args.repeats))
        xsum["sequences_per_s"] = 32 / xsum["seconds"]
        xsum["ratio_vs_nvidia_a100"] = xsum["sequences_per_s"] / NVIDIA_A100_XSUM_SEQ_PER_S
        report["xsum_gpu"] = xsum
        print(f"\nXSum shape on {jax.devices()[0].device_kind} (bart-large bf16, source 1024, beam 6, batch 32, "
              f"max_length 62, min_length = max): {xsum['sequences_per_s']:.1f} seq/s vs NVIDIA A100 "
              f"{NVIDIA_A100_XSUM_SEQ_PER_S} ({xsum['ratio_vs_nvidia_a100']:.2f}x); compile {xsum['compile_seconds']:.1f}s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
