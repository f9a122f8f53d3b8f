"""The GPU evidence bart_jax lacks, in one run on a lent H100/H200 (about 8 minutes): run it through
bench/gpu_check.sh, which installs the working tree first.

    python bench/gpu_check.py [--out DIR/gpu_check.json] [--budget-s 450] [--smoke]

1. bf16 train-step MFU (bench/train.py's step: AdamW, dropout 0.1, fp32 master weights) for bart-base and
   bart-large at source 512 + target 128, with the largest batch of a short descending list that fits
   (out-of-memory caught), against the device's datasheet peak (bart_jax.train.flops.device_peak).
2. XSum-shape generation (bench/generate.py's runner): bart-large bf16, beam 6, batch 32, source 1024,
   max_length 62 (min_length = max_length), sequences/s against NVIDIA's published 17.7 seq/s on A100.
3. fp32-vs-bf16 logits of a converted fixture (tests/fixtures/bart_default, a Hugging Face checkpoint),
   and both against the reference logits stored with it.
4. Whether attention runs through cuDNN: the compiled forward+backward HLO of bart-base is searched for
   cuDNN fused-attention custom calls, with the default `attention_implementation` and with "cudnn".
Every stage writes the JSON again when it finishes, so a run cut short keeps what it measured; a stage
that would start past --budget-s is skipped and says so. --smoke runs all of it on tiny shapes (CPU
is fine) so the script cannot rot (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # the other bench scripts, reused as modules
sys.path.insert(0, ROOT)

NVIDIA_A100_XSUM_SEQ_PER_S = 17.7  # NVIDIA DeepLearningExamples BART, XSum inference, A100 (bench/generate.py)

FULL = {
    "train": [("bart-base", [128, 64, 32, 16]), ("bart-large", [64, 32, 16, 8])],
    "source": 512, "target": 128, "steps": 5,
    "xsum": dict(preset="bart-large", num_beams=6, batch=32, source=1024, max_length=62, ngram=3, repeats=2),
    "cudnn_preset": "bart-base", "cudnn_batch": 8, "cudnn_length": 512,
}
SMOKE = {
    "train": [("tiny", [8, 4])], "source": 32, "target": 16, "steps": 1,
    "xsum": dict(preset="tiny", num_beams=2, batch=2, source=16, max_length=6, ngram=0, repeats=1),
    "cudnn_preset": "tiny", "cudnn_batch": 2, "cudnn_length": 16,
}


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def stage_train(plan, report):
    import jax

    import train as bench_train  # bench/train.py

    rows = []
    for name, batches in plan["train"]:
        row = {"shape": name, "dtype": "bfloat16", "tried": []}
        for batch in batches:
            r = None
            try:
                r = bench_train.bench_jax(name, "bfloat16", plan["steps"], 1, batch=batch,
                                          source_length=plan["source"], target_length=plan["target"])
            except Exception as e:  # noqa: BLE001 - only out-of-memory moves on to a smaller batch
                if not is_oom(e):
                    raise
                row["tried"].append({"batch": batch, "oom": str(e).splitlines()[0][:200]})
            if r is None:
                # outside the except clause, so the failed attempt's buffers (held by its traceback) are free
                jax.clear_caches()
                gc.collect()
                continue
            r.pop("config", None)
            row.update(r)  # with mfu against bart_jax.train.flops.device_peak (and its peak_source)
            break
        rows.append(row)
        mfu = f"{100 * row['mfu']:.1f}% vs {row['peak_source']}" if "mfu" in row else "n/a (none fit)"
        print(f"train {name} bf16 {plan['source']}+{plan['target']}: batch {row.get('batch', 'none fit')}, "
              f"{row.get('step_s', float('nan')):.3f} s/step, {row.get('tokens_per_s', 0):.0f} tokens/s, "
              f"{row.get('model_flops_per_s', 0) / 1e12:.1f} TFLOP/s, MFU {mfu}", flush=True)
        jax.clear_caches()
        gc.collect()
    report["train"] = rows


def stage_xsum(plan, report):
    import jax

    import generate as bench_generate  # bench/generate.py
    from bart_jax import init_params, preset

    case = dict(plan["xsum"])
    config = preset(case.pop("preset"), dropout=0.0, dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    row = bench_generate.run_bart_jax(config, params, case)
    row["sequences_per_s"] = case["batch"] / row["seconds"]
    row["nvidia_a100_seq_per_s"] = NVIDIA_A100_XSUM_SEQ_PER_S
    row["ratio_vs_nvidia_a100"] = row["sequences_per_s"] / NVIDIA_A100_XSUM_SEQ_PER_S
    report["xsum"] = row
    print(f"xsum shape beam {case['num_beams']} batch {case['batch']} source {case['source']} max_length "
          f"{case['max_length']}: {row['sequences_per_s']:.1f} seq/s (NVIDIA A100: {NVIDIA_A100_XSUM_SEQ_PER_S}, "
          f"ratio {row['ratio_vs_nvidia_a100']:.2f}); compile {row['compile_seconds']:.1f}s", flush=True)


def stage_fixture(report):
    import jax.numpy as jnp
    import numpy as np

    from bart_jax import Bart, from_pretrained

    path = os.path.join(ROOT, "tests", "fixtures", "bart_default")
    ref = np.load(os.path.join(path, "reference.npz"))
    inputs = [jnp.asarray(ref[k], jnp.int32) for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                        "decoder_attention_mask")]
    out = {}
    for dtype in ("float32", "bfloat16"):
        config, params = from_pretrained(path, dtype=dtype, param_dtype="float32", dropout=0.0,
                                         attention_dropout=0.0, activation_dropout=0.0)
        out[dtype] = np.asarray(Bart(config).apply({"params": params}, *inputs, deterministic=True), np.float64)
    mask = np.asarray(ref["decoder_attention_mask"], bool)
    reference = np.asarray(ref["logits"], np.float64)

    def diff(a, b):
        d = np.abs(a - b)[mask]
        return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                "argmax_agreement": float((a.argmax(-1) == b.argmax(-1))[mask].mean())}

    row = {"fixture": "tests/fixtures/bart_default", "logit_scale": float(np.abs(reference[mask]).max()),
           "bf16_vs_fp32": diff(out["bfloat16"], out["float32"]), "fp32_vs_reference": diff(out["float32"], reference),
           "bf16_vs_reference": diff(out["bfloat16"], reference)}
    report["fixture_logits"] = row
    print(f"fixture logits (|logit| <= {row['logit_scale']:.2f}): bf16 vs fp32 max {row['bf16_vs_fp32']['max_abs']:.2e}"
          f" mean {row['bf16_vs_fp32']['mean_abs']:.2e} argmax agree {row['bf16_vs_fp32']['argmax_agreement']:.3f}; "
          f"fp32 vs reference max {row['fp32_vs_reference']['max_abs']:.2e}", flush=True)


def stage_cudnn(plan, report):
    import jax
    import jax.numpy as jnp
    from bart_jax import Bart, init_params, preset

    rows = {}
    for impl in (None, "cudnn"):
        config = preset(plan["cudnn_preset"], dtype="bfloat16", param_dtype="float32", dropout=0.0,
                        attention_implementation=impl)
        b, n = plan["cudnn_batch"], plan["cudnn_length"]
        ids = jax.ShapeDtypeStruct((b, n), jnp.int32)
        model = Bart(config)

        def loss(p, ids):
            return jnp.mean(model.apply({"params": p}, ids, jnp.ones_like(ids), ids, jnp.ones_like(ids)))

        key = "default" if impl is None else impl
        try:  # (init traces the model too, so it can be what fails)
            params = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
            hlo = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile().as_text()
        except Exception as e:  # noqa: BLE001 - "cudnn" off a GPU (or an unsupported mask) is an answer
            rows[key] = {"compiled": False, "error": str(e).splitlines()[0][:300]}
            continue
        calls = sorted({line.split('custom_call_target="')[1].split('"')[0] for line in hlo.splitlines()
                        if 'custom_call_target="' in line})
        rows[key] = {"compiled": True, "custom_calls": calls,
                     "cudnn_attention": any("cudnn" in c.lower() and ("fmha" in c.lower() or "attention" in c.lower())
                                            for c in calls)}
        del hlo
    report["cudnn"] = rows
    print("cuDNN attention: " + "; ".join(
        f"{k}: {'uses cuDNN fMHA' if v.get('cudnn_attention') else 'no cuDNN fMHA'}"
        + ("" if v["compiled"] else f" (does not compile: {v['error'][:120]})") for k, v in rows.items()), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(HERE, "out"),
                                                      "gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="skip any stage that would start after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (for CPU, to keep the script working)")
    parser.add_argument("--stages", default="fixture,cudnn,train,xsum")
    args = parser.parse_args(argv)

    import jax

    from bart_jax.train.flops import datasheet_peaks

    start = time.perf_counter()
    device = jax.devices()[0]
    peaks = datasheet_peaks(device.device_kind)
    plan = SMOKE if args.smoke else FULL
    report = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
              "jax": jax.__version__, "smoke": args.smoke, "peak_tflops": peaks, "stages": {}}
    if device.platform != "gpu" and not args.smoke:
        print(f"warning: running on {device.platform}, not a GPU (use --smoke on CPU)", file=sys.stderr)
    print(f"device: {device.device_kind} ({device.platform}) x{jax.device_count()}, jax {jax.__version__}; "
          f"datasheet peak {peaks or 'unknown'} TFLOP/s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    stages = {"fixture": lambda: stage_fixture(report), "cudnn": lambda: stage_cudnn(plan, report),
              "train": lambda: stage_train(plan, report), "xsum": lambda: stage_xsum(plan, report)}
    failed = False
    for name in [s for s in args.stages.split(",") if s]:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["stages"][name] = f"skipped: budget of {args.budget_s:.0f}s spent"
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            stages[name]()
            report["stages"][name] = f"ok in {time.perf_counter() - t0:.1f}s"
        except Exception as e:  # noqa: BLE001 - one stage's failure must not lose the others
            failed = True
            report["stages"][name] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
