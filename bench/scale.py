"""What the real train step costs per device on a pod, from XLA's ahead-of-time compilation alone.

    python bench/scale.py [--models bart-base,bart-large,bart-1.5b] [--devices 8,64,256] [--out bench/out/scale.json]

For each model shape and each (data, fsdp, tensor) layout, the pretraining train step the loop runs
(bf16 compute, fp32 master weights and LAMB state, label smoothing, dropout, gradient accumulation over
--micro-batches) is lowered and compiled for a mesh of simulated CPU devices
(--xla_force_host_platform_device_count, one subprocess per device count) through `make_train_step`,
`state_shardings` and `compile_train_step` on ShapeDtypeStructs: nothing is executed or allocated. Per
device, from the compiled executable: the parameter and optimizer-state shards (its input shardings),
XLA's buffer assignment (`memory_analysis()`: arguments, temporaries = activations + gradient
accumulators + gathered weights), and every collective of the optimized HLO weighted by the trip counts
of the loops around it (layers x micro-batches), next to the analytic expectation. Derived columns use
the ASSUMPTIONS below, printed with the table and stored in the JSON.

Caveats (also in bench/RESULTS.md): XLA:CPU has no reduce-scatter creator, so FSDP's gradient
reduce-scatters appear as all-reduces (twice the ring traffic of the reduce-scatter XLA:GPU emits);
XLA:CPU widens bf16 collectives to f32 (its float-normalization pass runs after SPMD partitioning, whose
output gathers the layers' weights in bf16), so the all-gather column counts fp32 bytes; and the
temporaries are XLA:CPU's buffer assignment, not XLA:GPU's (different fusion and scheduling). Each row
lists the involuntary-rematerialization warnings its compilation printed ("remat_warnings").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bart_jax.train.config import GRADIENT_REDUCTIONS
from bart_jax.train.flops import datasheet_peaks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Architectures: bart-base / bart-large presets plus larger BART shapes (same recipe, wider and deeper).
# bart-1.5b: d_model 2048 with 12+12 layers is 1.5B parameters; the example (2048, 24+24) is
# bart-2.9b. Heads keep head_dim 64; ffn = 4 d_model.
MODELS = {
    "bart-base": dict(preset="bart-base"),
    "bart-large": dict(preset="bart-large"),
    "bart-1.5b": dict(preset="bart-large", d_model=2048, encoder_layers=12, decoder_layers=12,
                      encoder_attention_heads=32, decoder_attention_heads=32, encoder_ffn_dim=8192,
                      decoder_ffn_dim=8192),
    "bart-2.9b": dict(preset="bart-large", d_model=2048, encoder_layers=24, decoder_layers=24,
                      encoder_attention_heads=32, decoder_attention_heads=32, encoder_ffn_dim=8192,
                      decoder_ffn_dim=8192),
    "bart-6.5b": dict(preset="bart-large", d_model=3072, encoder_layers=24, decoder_layers=24,
                      encoder_attention_heads=48, decoder_attention_heads=48, encoder_ffn_dim=12288,
                      decoder_ffn_dim=12288),
    "bart-11.5b": dict(preset="bart-large", d_model=4096, encoder_layers=24, decoder_layers=24,
                       encoder_attention_heads=64, decoder_attention_heads=64, encoder_ffn_dim=16384,
                       decoder_ffn_dim=16384),
    "bart-24b": dict(preset="bart-large", d_model=5120, encoder_layers=32, decoder_layers=32,
                     encoder_attention_heads=80, decoder_attention_heads=80, encoder_ffn_dim=20480,
                     decoder_ffn_dim=20480),
    # A CPU-sized model for quick checks.
    "tiny": dict(preset="tiny"),
}

# (data, fsdp, tensor) per device count: pure data parallel, full FSDP, and mixes with tensor parallelism
# kept inside an 8-GPU node.
LAYOUTS = {
    8: [(8, 1, 1), (1, 8, 1), (1, 4, 2), (1, 1, 8)],
    64: [(8, 8, 1), (1, 64, 1), (2, 8, 4)],
    256: [(32, 8, 1), (1, 256, 1), (4, 16, 4)],
}

ASSUMPTIONS = {
    # H100 SXM / H200 dense bf16, from the one datasheet table (bart_jax.train.flops)
    "peak_bf16_flops_per_gpu": datasheet_peaks("H100")["bfloat16"] * 1e12,
    "assumed_mfu": 0.40,  # model FLOPs utilisation assumed for the compute time
    "nvlink_bytes_per_s": 450e9,  # NVLink 4, per GPU per direction (900 GB/s bidirectional)
    "infiniband_bytes_per_s": 50e9,  # NDR 400 Gb/s, one NIC per GPU
    "gpus_per_node": 8,  # a collective whose device-0 group spans <= 8 consecutive mesh devices stays on NVLink
    "ring_algorithm": "all-gather / reduce-scatter send (g-1)/g of the buffer per device, all-reduce 2(g-1)/g",
    "mesh_order": "devices in mesh order (data, fsdp, tensor), tensor innermost, 8 consecutive devices per node",
    "hbm_gib": {"H100 80GB": 80 * 1e9 / 2**30, "H200 141GB": 141 * 1e9 / 2**30},
}
GIB = 2 ** 30
STATE_BYTES_PER_PARAM = 16  # fp32 weights + LAMB/Adam mu, nu + fp32 gradient accumulator


def model_config(name: str):
    from bart_jax import preset

    spec = dict(MODELS[name])
    # bf16 compute, fp32 master weights; the vocabulary padded so the tensor axis can split it; dropout on.
    return preset(spec.pop("preset"), dtype="bfloat16", param_dtype="float32", pad_vocab_to_multiple_of=128,
                  dropout=0.1, **spec)


def compile_case(name: str, layout, per_shard_batch: int, source: int, target: int, micro: int,
                 gradient_reduction: str = "per_step", keep_hlo: str | None = None) -> dict:
    """Lower and compile one (model, layout) train step and measure it; runs in a process with enough
    simulated devices."""
    import math

    import jax

    from bart_jax.model import param_count
    from bart_jax.train import aot, flops, partitioning
    from bart_jax.train import config as C

    config = model_config(name)
    n = math.prod(layout)
    mesh = partitioning.make_mesh(C.MeshConfig(*layout), devices=jax.devices()[:n])
    d, f, t = layout
    batch = per_shard_batch * d * f * micro
    t0 = time.perf_counter()
    lowered, shardings, abstract = aot.lower_train_step(config, mesh, aot.StepShape(batch, source, target, micro),
                                                        gradient_reduction=gradient_reduction)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    if keep_hlo:
        with open(keep_hlo, "w") as fh:
            fh.write(hlo)
    state_sh = compiled.input_shardings[0][0]  # the TrainState shardings the executable takes
    mem = compiled.memory_analysis()
    colls = aot.collectives(hlo, n)
    param_bytes = aot.global_bytes(abstract.params)
    opt_bytes = aot.global_bytes(abstract.opt_state)
    # Analytic expectations per device: state split over fsdp x tensor; FSDP gathers the weights of its
    # tensor slice for the forward and again for the backward of every micro-batch (counted in fp32: XLA:CPU
    # widens the bf16 gathers the partitioner emits); the gradient is reduce-scattered over fsdp once per step
    # ("per_step": summed over micro-batches first) or once per micro-batch ("per_micro_batch"), ring: (f-1)/f
    # of the buffer, and the data axis all-reduces the shard once per step (2(d-1)/d).
    shard = param_bytes / (f * t)
    expect_gather = 2 * micro * (param_bytes / t) * (f - 1) / f
    fsdp_reductions = micro if gradient_reduction == "per_micro_batch" else 1
    expect_grad = fsdp_reductions * (param_bytes / t) * (f - 1) / f + shard * 2 * (d - 1) / d
    local = [c for c in colls if c["span"] <= ASSUMPTIONS["gpus_per_node"]]
    remote = [c for c in colls if c["span"] > ASSUMPTIONS["gpus_per_node"]]
    step_flops = flops.train_step_flops(config, batch, source, target)
    row = {
        "model": name, "params": param_count(abstract.params), "devices": n, "layout": list(layout),
        "global_batch": batch, "micro_batches": micro, "source_length": source, "target_length": target,
        "gradient_reduction": gradient_reduction,
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "param_bytes_total": param_bytes, "opt_bytes_total": opt_bytes,
        "param_bytes_per_device": aot.per_device_bytes(state_sh.params, abstract.params),
        "opt_bytes_per_device": aot.per_device_bytes(state_sh.opt_state, abstract.opt_state),
        "param_bytes_expected": shard, "opt_bytes_expected": opt_bytes / (f * t),
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        "collectives": aot.collective_summary(colls),
        "expected_fsdp_gather_traffic": expect_gather, "expected_grad_reduce_traffic": expect_grad,
        "traffic_nvlink": sum(c["traffic"] * c["count"] for c in local),
        "traffic_infiniband": sum(c["traffic"] * c["count"] for c in remote),
        "model_flops_per_step": step_flops,
    }
    a = ASSUMPTIONS
    row["compute_s"] = step_flops / n / (a["peak_bf16_flops_per_gpu"] * a["assumed_mfu"])
    row["comm_s"] = (row["traffic_nvlink"] / a["nvlink_bytes_per_s"]
                     + row["traffic_infiniband"] / a["infiniband_bytes_per_s"])
    row["comm_over_compute"] = row["comm_s"] / row["compute_s"]
    return row


def worker(args) -> int:
    """Compile the cases given as JSON on argv in this process (its device count is set by XLA_FLAGS).
    XLA's warnings go to a file, so each row lists the rematerialization warnings its compile raised."""
    import tempfile

    log = tempfile.TemporaryFile("w+")
    os.dup2(log.fileno(), 2)
    for case in json.loads(args.worker):
        start = log.seek(0, os.SEEK_END)
        try:
            row = compile_case(**case)
        except Exception as e:  # one failed case must not lose the others
            row = {**case, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        log.seek(start)
        row["remat_warnings"] = [line.strip()[:300] for line in log.read().splitlines() if "rematerializ" in line]
        print("SCALE_ROW " + json.dumps(row), flush=True)
    return 0


def run_device_count(n: int, cases: list[dict], timeout: float, on_row=None) -> list[dict]:
    """Compile `cases` in a subprocess with `n` simulated devices; rows as they arrive (on_row(row) each)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "1"}  # warnings on: each row lists its remat warnings
    rows = []
    with subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cases)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            if line.startswith("SCALE_ROW "):
                rows.append(json.loads(line[len("SCALE_ROW "):]))
                if on_row:
                    on_row(rows[-1])
            if time.monotonic() > deadline:
                proc.kill()
                break
    if len(rows) != len(cases):
        print(f"{n}-device worker (exit {proc.returncode}) returned {len(rows)} of {len(cases)} cases",
              file=sys.stderr)
    return rows


def fit_largest(rows: list[dict]) -> list[dict]:
    """Per layout measured for >= 2 models: fit peak bytes/device = a * params / (fsdp * tensor) + b * layers
    * d_model (state + gradient accumulators scale with the parameter shard, activations with depth x
    width at this per-device batch; a is kept >= STATE_BYTES_PER_PARAM) and return the largest MODELS
    shape predicted to fit each HBM size. An extrapolation from the compiled cases, labelled as such."""
    import numpy as np

    shapes = {}
    for name, spec in MODELS.items():
        if name == "tiny":
            continue
        cfg = model_config(name)
        shapes[name] = (approx_params(cfg), (cfg.encoder_layers + cfg.decoder_layers) * cfg.d_model)
    out = []
    cases = sorted({(tuple(r["layout"]), r["gradient_reduction"]) for r in rows if "error" not in r},
                   key=lambda x: (x[0][0] * x[0][1] * x[0][2], x))
    for lay, reduction in cases:
        got = [r for r in rows if "error" not in r and tuple(r["layout"]) == lay
               and r["gradient_reduction"] == reduction]
        if len(got) < 2:
            continue
        shard = lay[1] * lay[2]
        a_mat = np.array([[r["params"] / shard, shapes[r["model"]][1]] for r in got], float)
        peaks = np.array([r["peak_bytes"] for r in got], float)
        coef, *_ = np.linalg.lstsq(a_mat, peaks, rcond=None)
        if coef[0] < STATE_BYTES_PER_PARAM:
            # Ill-conditioned where the state shard is negligible (fsdp x tensor large): pin a to the
            # state every layout must hold (fp32 weights + 2 Adam moments + fp32 gradient accumulator).
            coef[0] = STATE_BYTES_PER_PARAM
            rest = peaks - coef[0] * a_mat[:, 0]
            coef[1] = float(a_mat[:, 1] @ rest / (a_mat[:, 1] @ a_mat[:, 1]))
        row = {"layout": list(lay), "gradient_reduction": reduction, "bytes_per_param_shard": coef[0],
               "bytes_per_layer_width": coef[1],
               "fitted_on": [r["model"] for r in got]}
        for hbm, gib in ASSUMPTIONS["hbm_gib"].items():
            fits = [(p, n) for n, (p, lw) in shapes.items() if coef[0] * p / shard + coef[1] * lw <= gib * GIB]
            best = max(fits)[1] if fits else "none"
            row[hbm] = f">= {best} (largest shape listed)" if best == max(shapes.items(), key=lambda x: x[1][0])[0] \
                else best
        out.append(row)
    return out


def print_fits(rows: list[dict]) -> None:
    fits = fit_largest(rows)
    if fits:
        print("\nLargest MODELS shape predicted to fit (EXTRAPOLATED: peak = a*params/(fsdp*tensor) + "
              "b*layers*d_model fitted per layout on the compiled models, same per-device batch):")
        for f in fits:
            print(f"  {'x'.join(map(str, f['layout']))} {f['gradient_reduction']}: " + ", ".join(
                f"{hbm}: {f[hbm]}" for hbm in ASSUMPTIONS["hbm_gib"]) +
                f"  (a={f['bytes_per_param_shard']:.1f} B/param, b={f['bytes_per_layer_width'] / 2**20:.2f} MiB"
                f" per layer x d_model unit, fitted on {', '.join(f['fitted_on'])})")


def approx_params(cfg) -> int:
    """Parameter count of a BartConfig (exact for this model's layout, without building it)."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    attn = 4 * d * d + 4 * d
    enc = attn + 2 * d * cfg.encoder_ffn_dim + cfg.encoder_ffn_dim + d + 4 * d
    dec = 2 * attn + 2 * d * cfg.decoder_ffn_dim + cfg.decoder_ffn_dim + d + 6 * d
    pos = 2 * (cfg.max_position_embeddings + 2) * d
    return v * d + v + pos + 4 * d + cfg.encoder_layers * enc + cfg.decoder_layers * dec


def fmt_table(rows: list[dict], markdown: bool = False) -> str:
    cols = ["model", "params", "dev", "d×f×t", "grad. reduction", "batch", "params/dev MiB (exp)",
            "opt/dev MiB (exp)", "temp GiB", "peak GiB", "all-gather GB", "all-reduce GB", "other GB", "exp. gather+grad GB",
            "NVLink GB", "IB GB", "compute ms", "comm ms", "comm/compute", "fits 80/141"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    else:
        lines.append("  ".join(cols))
    for r in rows:
        if "error" in r:
            lay = r["layout"]
            cells = [r["name"], "", str(lay[0] * lay[1] * lay[2]), "×".join(map(str, lay)),
                     r["gradient_reduction"], "", r["error"][:80]]
            cells += [""] * (len(cols) - len(cells))
        else:
            c = r["collectives"]
            other = sum(c[k]["traffic"] for k in ("reduce-scatter", "all-to-all", "collective-permute"))
            peak = r["peak_bytes"] / GIB
            fits = "/".join("yes" if peak <= g else "no" for g in ASSUMPTIONS["hbm_gib"].values())
            cells = [
                r["model"], f"{r['params'] / 1e9:.2f}B", str(r["devices"]), "×".join(map(str, r["layout"])),
                r["gradient_reduction"], str(r["global_batch"]),
                f"{r['param_bytes_per_device'] / 2**20:.0f} ({r['param_bytes_expected'] / 2**20:.0f})",
                f"{r['opt_bytes_per_device'] / 2**20:.0f} ({r['opt_bytes_expected'] / 2**20:.0f})",
                f"{r['temp_bytes'] / GIB:.1f}", f"{peak:.1f}",
                f"{c['all-gather']['traffic'] / 1e9:.2f}", f"{c['all-reduce']['traffic'] / 1e9:.2f}",
                f"{other / 1e9:.2f}",
                f"{(r['expected_fsdp_gather_traffic'] + r['expected_grad_reduce_traffic']) / 1e9:.2f}",
                f"{r['traffic_nvlink'] / 1e9:.2f}", f"{r['traffic_infiniband'] / 1e9:.2f}",
                f"{1e3 * r['compute_s']:.0f}", f"{1e3 * r['comm_s']:.0f}", f"{r['comm_over_compute']:.2f}", fits]
        lines.append(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bart-large,bart-1.5b,bart-base", help=f"comma list of {list(MODELS)}")
    parser.add_argument("--devices", default="8,64,256", help=f"comma list of {sorted(LAYOUTS)}")
    parser.add_argument("--layouts", default=None,
                        help="override the layouts: 'd,f,t;d,f,t' (each must multiply to a --devices count)")
    parser.add_argument("--per-device-batch", type=int, default=4,
                        help="sequences per batch shard (data x fsdp) per micro-batch")
    parser.add_argument("--source-length", type=int, default=512)
    parser.add_argument("--target-length", type=int, default=512)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--gradient-reduction", default="per_step", choices=GRADIENT_REDUCTIONS,
                        help="train.gradient_reduction: when the fsdp axis reduces the gradient")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per device count")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--out", default=os.path.join(HERE, "out", "scale.json"))
    parser.add_argument("--from-json", help="only print the table of earlier runs' JSON (comma list, merged)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.from_json:
        merged = {}  # a later file's row for the same (model, layout, reduction) replaces an earlier one
        for path in args.from_json.split(","):
            with open(path) as f:
                for r in json.load(f)["rows"]:
                    r.setdefault("gradient_reduction", "per_step")  # rows written before the option existed
                    merged[(r.get("model", r.get("name")), tuple(r["layout"]), r["gradient_reduction"])] = r
        names = list(MODELS)

        def order(r):
            lay, n = tuple(r["layout"]), r["layout"][0] * r["layout"][1] * r["layout"][2]
            known = LAYOUTS.get(n, [])
            return (n, names.index(r.get("model", r.get("name"))), known.index(lay) if lay in known else len(known),
                    r["gradient_reduction"] != "per_step")

        rows = sorted(merged.values(), key=order)
        print(fmt_table(rows, markdown=args.markdown))
        print_fits(rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"assumptions": ASSUMPTIONS, "merged_from": args.from_json.split(","), "rows": rows,
                       "fits": fit_largest(rows)}, f, indent=1)
        print(f"wrote {args.out}")
        return 0

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {list(MODELS)}")
    counts = [int(n) for n in args.devices.split(",") if n]
    if args.layouts:
        layouts = [tuple(int(x) for x in s.split(",")) for s in args.layouts.split(";")]
        by_count = {n: [lay for lay in layouts if lay[0] * lay[1] * lay[2] == n] for n in counts}
    else:
        by_count = {n: LAYOUTS[n] for n in counts if n in LAYOUTS}
    import jax

    rows = []
    start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(row=None):
        # rewritten after every case, so an interrupted run keeps what it compiled
        with open(args.out, "w") as f:
            json.dump({"assumptions": ASSUMPTIONS, "jax": jax.__version__, "args": vars(args), "rows": rows}, f,
                      indent=1)
        if row is not None:
            print(f"{row.get('model', row.get('name'))} {row['layout']}: "
                  f"{'error' if 'error' in row else 'ok'} ({time.perf_counter() - start:.0f}s so far)",
                  file=sys.stderr, flush=True)

    for m in models:  # model-major: the models listed first are complete first
        for n, layouts in by_count.items():
            cases = [dict(name=m, layout=list(lay), per_shard_batch=args.per_device_batch, source=args.source_length,
                          target=args.target_length, micro=args.micro_batches,
                          gradient_reduction=args.gradient_reduction) for lay in layouts]
            if cases:
                run_device_count(n, cases, args.timeout, on_row=lambda r: (rows.append(r), save(r)))

    print(f"Train step AOT-compiled for simulated CPU meshes (nothing executed): bf16 compute, fp32 params + "
          f"LAMB state, {args.micro_batches} micro-batches of {args.per_device_batch} sequences per batch shard, "
          f"source {args.source_length} + target {args.target_length}. Per device. GB = 1e9 bytes of ring "
          "traffic per step; (exp) = analytic expectation.")
    print("Assumptions: " + "; ".join(f"{k}={v}" for k, v in ASSUMPTIONS.items()))
    print(fmt_table(rows, markdown=args.markdown))
    print_fits(rows)
    save()
    print(f"wrote {args.out}")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
