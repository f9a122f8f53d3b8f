"""Training throughput, MFU and compile time of the bart_jax train step, beside PyTorch and HF Flax.

    python bench/train.py [--shapes d256x3,bart-base-512,bart-base] [--dtypes float32,bfloat16]
                          [--steps 4] [--rounds 3] [--threads N] [--out bench/out/train.json]

For each model shape and compute dtype: one jitted train step (AdamW, label smoothing 0.1, dropout 0.1,
fp32 master weights) on one device, timed over several steps after compilation. MFU = model FLOPs per
step (bart_jax.train.flops.train_step_flops: 3 x the forward's matmul FLOPs) / step time / the device's
peak in that dtype (bart_jax.train.flops.device_peak: a GPU's datasheet figure; on CPU the rate of a
matmul measured in this run, labelled "measured matmul"). If --torch-python (default: this python, when it
has torch + transformers) names an interpreter with torch + transformers, the same model config and batch are trained in the same run by two peers, each in a
subprocess of that python: PyTorch (BartForConditionalGeneration + torch.optim.AdamW, bf16 via CPU
autocast) and HF Flax (FlaxBartForConditionalGeneration, random weights, a jitted value_and_grad +
optax.adamw step, `dtype=bfloat16` compute with fp32 parameters for bf16); throughput ratios are reported
against both. All three stay compiled side by side and are timed in turn, round after round (one at a time,
never sharing the CPUs): a slow minute of the machine hits every implementation alike, where timing them one
after the other would credit it to whichever ran then. Step time is the median round.

Compile time, for all three: `lower_s` + `compile_s` (jit(...).lower(...) and .compile(), the JAX runs)
and `first_step_s`, the wall time from the start of lowering (PyTorch: from the first call) to the first
finished step. --threads limits every run (ours, both peers) to N CPUs (affinity + torch threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Shapes: name -> (preset, preset overrides, batch, source length, target length); "main" is read from the
# main job's config instead (`main_job_shape`).
SHAPES = {
    "tiny": ("tiny", {}, 16, 128, 128),
    "main": None,
    # a medium model: d 256 x 3+3 layers
    "d256x3": ("tiny", dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                            max_position_embeddings=512), 8, 256, 64),
    "bart-base-512": ("bart-base", {}, 4, 512, 128),
    "bart-base": ("bart-base", {}, 4, 128, 128),
    "bart-large": ("bart-large", {}, 2, 128, 128),
}


def main_job_shape():
    """The main job's pretraining step (configs/tiny.yaml): its model, batch and row length
    (denoising: target length = source length)."""
    from bart_jax.pipeline import DEFAULT_CONFIG
    from bart_jax.train.config import load_config

    cfg = load_config(DEFAULT_CONFIG)
    train = cfg.pretrain.train
    return cfg.model.bart_config(), train.batch_size, train.source_length, train.source_length


def shape(name: str, **model_overrides):
    """(BartConfig with `model_overrides`, batch, source length, target length) of shape `name`."""
    import dataclasses

    from bart_jax import preset

    if name == "main":
        model, batch, src, tgt = main_job_shape()
        return dataclasses.replace(model, **model_overrides), batch, src, tgt
    preset_name, overrides, batch, src, tgt = SHAPES[name]
    return preset(preset_name, **{**overrides, **model_overrides}), batch, src, tgt


DEFAULT_SHAPES = "main,d256x3,bart-base-512,bart-base"

# Peers run as `python -c SCRIPT config_json batch src_len tgt_len dtype warmup threads`: they compile, warm up
# and print one JSON line (compile times), then time as many steps as each line of their stdin asks and answer
# with one JSON line each, until stdin closes. Both draw the batch the same way (torch.randint with seed 0, as
# ids in [4, vocab)).
TORCH_SCRIPT = r"""
import json, os, sys, time
cfg_json, dtype = sys.argv[1], sys.argv[5]
batch, src, tgt = map(int, sys.argv[2:5])
warmup, threads = map(int, sys.argv[6:8])
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
import torch
from transformers import BartConfig, BartForConditionalGeneration
torch.set_num_threads(threads)
torch.manual_seed(0)
model = BartForConditionalGeneration(BartConfig(**json.loads(cfg_json)))
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
g = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size
ids = torch.randint(4, vocab, (batch, src), generator=g)
labels = torch.randint(4, vocab, (batch, tgt), generator=g)
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
t = time.perf_counter()
loss = step()
first = time.perf_counter() - t
for _ in range(warmup - 1):
    step()
print(json.dumps({"lower_s": None, "compile_s": None, "first_step_s": first}), flush=True)
for line in sys.stdin:  # SERVE: each line is a number of steps to time; the answer is one JSON line
    t = time.perf_counter()
    for _ in range(int(line)):
        loss = step()
    print(json.dumps({"step_s": (time.perf_counter() - t) / int(line), "loss": float(loss)}), flush=True)
"""

FLAX_SCRIPT = r"""
import json, os, sys, time
cfg_json, dtype = sys.argv[1], sys.argv[5]
batch, src, tgt = map(int, sys.argv[2:5])
warmup, threads = map(int, sys.argv[6:8])
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])  # before XLA sizes its thread pool
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, jax.numpy as jnp, optax, torch
from transformers import BartConfig, FlaxBartForConditionalGeneration
from transformers.models.bart.modeling_flax_bart import shift_tokens_right
config = BartConfig(**json.loads(cfg_json))
model = FlaxBartForConditionalGeneration(config, seed=0, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
g = torch.Generator().manual_seed(0)  # the same batch as the PyTorch peer
vocab = config.vocab_size
ids = jnp.asarray(torch.randint(4, vocab, (batch, src), generator=g).numpy(), jnp.int32)
labels = jnp.asarray(torch.randint(4, vocab, (batch, tgt), generator=g).numpy(), jnp.int32)
dec = jnp.asarray(shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id))
mask = jnp.ones_like(ids)
tx = optax.adamw(1e-4, weight_decay=0.01)
params = model.params
opt_state = tx.init(params)
def loss_fn(params, rng):
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, params=params, dropout_rng=rng,
                   train=True).logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, vocab), 0.1)
    return optax.softmax_cross_entropy(logits, targets).mean()
def train_step(params, opt_state, rng):
    rng, sub = jax.random.split(rng)
    loss, grads = jax.value_and_grad(loss_fn)(params, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rng, loss
rng = jax.random.PRNGKey(0)
t0 = time.perf_counter()
lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, rng)
t1 = time.perf_counter()
step = lowered.compile()
t2 = time.perf_counter()
params, opt_state, rng, loss = step(params, opt_state, rng)
jax.block_until_ready(loss)
first = time.perf_counter() - t0
for _ in range(warmup - 1):
    params, opt_state, rng, loss = step(params, opt_state, rng)
jax.block_until_ready(loss)
print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": first}), flush=True)
for line in sys.stdin:  # SERVE: as the PyTorch peer
    t = time.perf_counter()
    for _ in range(int(line)):
        params, opt_state, rng, loss = step(params, opt_state, rng)
    jax.block_until_ready(loss)
    print(json.dumps({"step_s": (time.perf_counter() - t) / int(line), "loss": float(loss)}), flush=True)
"""


def hf_config(config) -> dict:
    hf = config.to_hf_config()
    for k in ("architectures", "model_type", "is_encoder_decoder", "use_cache"):
        hf.pop(k, None)
    return hf


def setup_jax(name: str, dtype: str, warmup: int, batch: int | None = None, source_length: int | None = None,
              target_length: int | None = None):
    """Compile and warm up the jitted train step of shape `name` (batch and lengths overridable; target
    defaults to source). Returns (result dict with compile times and the shape, `time_steps(n)` -> seconds
    per step over n more steps)."""
    import jax
    import numpy as np

    from bart_jax.model import param_logical_axes, shift_tokens_right
    from bart_jax.train import config as C
    from bart_jax.train import flops, optim, partitioning
    from bart_jax.train.state import abstract_params, create_train_state
    from bart_jax.train.step import compile_train_step, make_train_step

    model, default_batch, default_source, default_target = shape(name, dtype=dtype, param_dtype="float32",
                                                                 dropout=0.1)
    batch = batch or default_batch
    src = source_length or default_source
    tgt = target_length or (source_length if source_length else default_target)
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    optimizer, schedule = optim.make_optimizer(
        C.OptimizerConfig(name="adamw", learning_rate=1e-4, clip_norm=0.0), C.ScheduleConfig(decay="constant"),
        1000, abstract_params(model), param_logical_axes(model))
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = compile_train_step(make_train_step(model, optimizer, schedule, label_smoothing=0.1), shardings, mesh)
    rng = np.random.RandomState(0)
    ids = rng.randint(4, model.vocab_size, (batch, src)).astype(np.int32)
    labels = rng.randint(4, model.vocab_size, (batch, tgt)).astype(np.int32)
    dec = np.asarray(shift_tokens_right(labels, model.pad_token_id, model.decoder_start_token_id))
    data = jax.device_put(dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=dec,
                               decoder_attention_mask=np.ones_like(dec), labels=labels),
                          partitioning.batch_sharding(mesh))
    start = time.perf_counter()
    lowered = step.lower(state, data)
    lower_s = time.perf_counter() - start
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)

    def time_steps(n: int) -> float:
        nonlocal state, metrics
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t) / n
        result["loss"] = float(metrics["loss"])
        return step_s

    step_flops = flops.train_step_flops(model, batch, src, tgt)
    peak = flops.device_peak(model.compute_dtype)
    result = {"shape": name, "dtype": dtype, "batch": batch, "source_length": src, "target_length": tgt,
              "lower_s": lower_s, "compile_s": compile_s, "first_step_s": first_step_s,
              "model_flops_per_step": step_flops, "peak_flops": peak.flops_per_s, "peak_source": peak.source,
              "config": hf_config(model)}
    return result, time_steps


def bench_jax(name: str, dtype: str, steps: int, warmup: int, batch: int | None = None,
              source_length: int | None = None, target_length: int | None = None) -> dict:
    """`setup_jax`, then one timing of `steps` steps: step time, tokens/s, model FLOP/s and MFU."""
    result, time_steps = setup_jax(name, dtype, warmup, batch, source_length, target_length)
    return with_step_time(result, time_steps(steps))


def with_step_time(result: dict, step_s: float) -> dict:
    tokens = result["batch"] * (result["source_length"] + result["target_length"])
    return {**result, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "model_flops_per_s": result["model_flops_per_step"] / step_s,
            "mfu": result["model_flops_per_step"] / step_s / result["peak_flops"]}


class Peer:
    """A peer script (TORCH_SCRIPT / FLAX_SCRIPT) serving timings in a subprocess of `python`, on the
    config and batch shape of a `setup_jax` result. `ready` holds its compile times, `loss` its last step's
    loss; None fields on failure."""

    def __init__(self, label: str, script: str, python: str, result: dict, warmup: int, threads: int):
        self.label, self.ready, self.loss = label, None, None
        argv = [python, "-c", script, json.dumps(result["config"]), str(result["batch"]),
                str(result["source_length"]), str(result["target_length"]), result["dtype"], str(warmup),
                str(threads)]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
        except OSError as e:
            print(f"{label} peer failed: {e}", file=sys.stderr)
            self.proc = None
            return
        self.ready = self._answer()

    def _answer(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            print(f"{self.label} peer failed:\n{self.proc.stderr.read()[-2000:]}", file=sys.stderr)
            self.close()
            return None
        return json.loads(line)

    def time_steps(self, n: int) -> float | None:
        if self.proc is None:
            return None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if answer is None:
            return None
        self.loss = answer["loss"]
        return answer["step_s"]

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_shape(name: str, dtype: str, args, peers: list[str]) -> dict:
    """Ours and each peer compiled once, then `args.rounds` rounds in which each times `args.steps` steps in
    turn (one at a time, so they never share the CPUs): drifts of the machine hit all three alike. Step
    time = the median round; ratios are of medians."""
    result, ours = setup_jax(name, dtype, args.warmup)
    scripts = {"torch": TORCH_SCRIPT, "flax": FLAX_SCRIPT}
    servers = {p: Peer(p, scripts[p], args.torch_python, result, args.warmup, args.threads) for p in peers}
    rounds = {p: [] for p in ["bart_jax", *servers]}
    try:
        for _ in range(args.rounds):
            rounds["bart_jax"].append(ours(args.steps))
            for p, server in servers.items():
                rounds[p].append(server.time_steps(args.steps))
    finally:
        for server in servers.values():
            server.close()
    result = with_step_time(result, _median(rounds["bart_jax"]))
    result["rounds_step_s"] = rounds
    tokens = result["batch"] * (result["source_length"] + result["target_length"])
    for p in ("torch", "flax"):
        step_s = _median(rounds.get(p, []))
        ready = servers[p].ready if p in servers else None
        result[p] = None if step_s is None or ready is None else {
            **ready, "step_s": step_s, "tokens_per_s": tokens / step_s, "loss": servers[p].loss}
        result[f"speedup_vs_{p}"] = result["tokens_per_s"] / result[p]["tokens_per_s"] if result[p] else None
    return result


def _fmt(x, spec, missing="n/a"):
    return missing if x is None else format(x, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=4, help="steps per implementation per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds: each implementation times --steps steps in turn; the median round counts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1: the first compiles)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs for every run (ours and peers)")
    parser.add_argument("--torch-python", default=None,
                        help="python with torch + transformers (+ jax, flax, optax for the HF Flax peer); "
                             "'' to skip both peers")
    parser.add_argument("--peers", default="torch,flax", help="comma list of peers to run: torch, flax")
    parser.add_argument("--out", default=os.path.join("bench", "out", "train.json"))
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    # Before jax starts: XLA sizes its CPU thread pool from the affinity mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

    import jax

    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    peers = [p for p in args.peers.split(",") if p]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; expected some of {sorted(SHAPES)}")
    if set(peers) - {"torch", "flax"}:
        parser.error(f"--peers: expected torch and/or flax, got {peers}")
    device = jax.devices()[0]
    if args.torch_python is None:  # this python, if it has the peers' packages (as bench/generate.py)
        import importlib.util

        has_peers = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
        args.torch_python = sys.executable if has_peers else ""
    use_peers = bool(args.torch_python) and os.path.exists(args.torch_python)
    rows = []
    for name in shapes:
        for dtype in dtypes:
            r = bench_shape(name, dtype, args, peers if use_peers else [])
            rows.append(r)
            print(f"done {name} {dtype}: {r['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    header = (f"{'shape':<13} {'dtype':<9} {'B x (S+T)':>12} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{'peak TF/s':>9} {'MFU':>6} {'torch tok/s':>11} {'vs torch':>8} {'flax tok/s':>10} {'vs flax':>7}")
    print(f"device: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores, {args.threads} used; "
          "tokens = source + target positions; MFU against: "
          + "; ".join(sorted({f"{r['dtype']} {r['peak_source']}" for r in rows})))
    print(header)
    print("-" * len(header))
    for r in rows:
        t, f = r["torch"], r["flax"]
        shape = f"{r['batch']}x({r['source_length']}+{r['target_length']})"
        print(f"{r['shape']:<13} {r['dtype']:<9} {shape:>12} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>10.0f} {r['model_flops_per_s'] / 1e12:>8.3f} "
              f"{r['peak_flops'] / 1e12:>9.3f} {100 * r['mfu']:>5.1f}% "
              f"{_fmt(t and t['tokens_per_s'], '.0f'):>11} {_fmt(r['speedup_vs_torch'], '.2f') + 'x':>8} "
              f"{_fmt(f and f['tokens_per_s'], '.0f'):>10} {_fmt(r['speedup_vs_flax'], '.2f') + 'x':>7}")
    header = (f"{'shape':<13} {'dtype':<9} | {'bart_jax lower':>14} {'compile':>8} {'1st step':>8} | "
              f"{'HF Flax lower':>13} {'compile':>8} {'1st step':>8} | {'torch 1st step':>14}")
    print("\ncompile time, seconds (1st step: from the start of lowering to the first finished step)")
    print(header)
    print("-" * len(header))
    for r in rows:
        f, t = r["flax"] or {}, r["torch"] or {}
        print(f"{r['shape']:<13} {r['dtype']:<9} | {r['lower_s']:>14.2f} {r['compile_s']:>8.2f} "
              f"{r['first_step_s']:>8.2f} | {_fmt(f.get('lower_s'), '.2f'):>13} {_fmt(f.get('compile_s'), '.2f'):>8} "
              f"{_fmt(f.get('first_step_s'), '.2f'):>8} | {_fmt(t.get('first_step_s'), '.2f'):>14}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"device": str(device.device_kind), "platform": device.platform, "cpu_count": os.cpu_count(),
                   "threads": args.threads,
                   "results": [{k: v for k, v in r.items() if k != "config"} for r in rows]}, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
