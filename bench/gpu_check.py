"""What a GPU user decides by, measured in one run of about 8 minutes on one lent H100/H200. Start it with
`bash bench/gpu_check.sh` (docs/gpu.md), which installs the project and bench/wheels/, then runs this file.

    python bench/gpu_check.py [--out DIR/gpu_check.json] [--budget-s 450] [--smoke] [--stages LIST]
                              [--torch-python PYTHON]

Stages, in order (each prints its lines, the table comes at the end, the JSON is rewritten after each):
  train      the real pretraining step, bf16: configs/base.yaml (bart-base) and configs/large.yaml (bart-large)
             as the training loop builds them -- LAMB with per-layer trust ratio, the fairseq noise applied on
             device to synthetic 512-token rows, the label-smoothed loss, dropout -- through make_optimizer,
             noise_batch_fns, make_train_step and compile_train_step. Denoising rows are their own targets, so
             the shape is 512 source + 512 target tokens. Batch: the largest of a grid that XLA's buffer
             assignment (memory_analysis of the compiled step) fits in the device's memory pool, a smaller one
             on an out-of-memory error. Several timed repeats after warm-up (median and spread); MFU against
             the datasheet peak (bart_jax.train.flops.device_peak); the HBM high-water mark
             (memory_stats()['peak_bytes_in_use']) next to bench/scale.py's single-device prediction for the
             same shape (XLA:CPU ahead-of-time, computed in the background meanwhile).
  attention  the bart-base step at the same batch with attention dropout off (with it on, attention takes the
             written-out path), timed with the default attention and with the other of cuDNN fused attention
             / XLA attention; which one the default picks is read from the compiled program.
  logits     a bart-base-sized random model's logits in bf16 and in fp32 with TF32 (JAX's default matmul
             precision on GPU) against fp32 at 'highest' precision (TF32 off); and the converted fixture
             tests/fixtures/bart_default against its stored Hugging Face logits.
  xsum       beam search at XSum shapes: bart-large bf16, batch 32, sources of varied length padded to 1024,
             the xsum generation preset (beam 6, min_length 11, max_length 62, no-repeat 3-grams, early
             stopping, forced EOS), so hypotheses end where the model ends them (random weights: mostly at
             max_length); sequences/s; NVIDIA's 17.7 seq/s (A100, DeepLearningExamples) is context only.
  peer       Hugging Face PyTorch BART on the same GPU (bench/gpu_peer_torch.py, --torch-python, default this
             python): the train step at each train row's shape (SDPA attention, bf16 autocast) and `generate`
             with the xsum stage's weights, inputs and controls. Skipped, and said so, without torch.

The heavy stages run in child processes (one per model), so each measures its own memory and returns the
GPU's memory when done. A stage that fails prints its error and the others still run. Exit status: 0 all
ran; 2 a missing module or a backend that is not a GPU (one line, nothing run; --smoke allows a CPU);
otherwise the sum of the failed stages' bits: train 8, attention 16, logits 32, xsum 64, peer 128. A stage
that would start after --budget-s seconds is skipped and says so. --smoke: tiny shapes, CPU is fine
(tests/test_gpu_check.py runs it where the GPU machine's missing packages cannot be imported).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The other bench scripts, reused as modules. bart_jax itself comes installed (gpu_check.sh installs it; its
# package bart_jax.configs lives in the tree's configs/, so the tree itself is not the package).
sys.path.insert(0, HERE)

NVIDIA_A100_XSUM_SEQ_PER_S = 17.7  # NVIDIA DeepLearningExamples BART, XSum inference, A100 (bench/generate.py)
ROW = "GPU_CHECK_ROW "  # a child's result line (also bench/gpu_peer_torch.py's)
STAGE_BITS = {"train": 8, "attention": 16, "logits": 32, "xsum": 64, "peer": 128}

# Third-party modules the stages import (the GPU machine's software must provide them, or bench/wheels/).
REQUIRED = ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml_dtypes", "safetensors", "yaml", "omegaconf")
# The project modules the stages import: importing them finds a missing module the list above forgot.
PROJECT_MODULES = ("bart_jax.model", "bart_jax.train.config", "bart_jax.train.inputs", "bart_jax.train.optim",
                   "bart_jax.train.state", "bart_jax.train.step", "bart_jax.train.flops", "bart_jax.noise",
                   "bart_jax.decode.generate", "bart_jax.convert", "scale", "train")

FULL = {
    # first_batch: where the batch search starts on 72 GiB of pool (scaled by the pool), meant to be too big;
    # search_s: a third compile (a larger batch) only if it would end this many seconds into the child
    "train": [dict(name="base", config="base", overrides=[], scale_model="bart-base", first_batch=384, search_s=110),
              dict(name="large", config="large", overrides=[], scale_model="bart-large", first_batch=192,
                   search_s=140)],
    "tokens": 512, "batch_grid": [8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512],
    "memory_margin": 0.92,  # use at most this share of the memory pool by XLA's buffer assignment
    "warmup": 2, "steps": 3, "repeats": 5, "attention_repeats": 3,
    "logits": dict(preset="bart-base", batch=4, source=512, target=128),
    "xsum": dict(preset="bart-large", batch=32, source=1024, min_source=256, controls={}, repeats=3),
    "peer_repeats": 3,
}
SMOKE = {
    "train": [dict(name="base", config="base", overrides=["model.preset=tiny"], scale_model="tiny", batch=4),
              dict(name="large", config="large", overrides=["model.preset=tiny"], scale_model="tiny", batch=4)],
    "tokens": 32, "batch_grid": [2, 4, 8], "memory_margin": 0.92,
    "warmup": 1, "steps": 1, "repeats": 2, "attention_repeats": 1,
    "logits": dict(preset="tiny", batch=3, source=24, target=10),
    "xsum": dict(preset="tiny", batch=3, source=24, min_source=8,
                 controls=dict(num_beams=2, max_length=8, min_length=3), repeats=1),
    "peer_repeats": 1,
}


def fail(message: str) -> int:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ preflight
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses the module (or a parent that cannot be imported)
        return False


def missing_modules() -> list[str]:
    """Every REQUIRED module that cannot be found; if none, any module a stage's import chain cannot find."""
    missing = [m for m in REQUIRED if not _importable(m)]
    if not missing:
        for module in PROJECT_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                missing.append(e.name or str(e))
    return sorted(set(missing))


def module_origins(names=("omegaconf", "jax", "flax", "optax", "bart_jax")) -> dict:
    """Where each module was imported from (so a report says which copy of a shipped wheel ran)."""
    out = {}
    for name in names:
        module = sys.modules.get(name) or importlib.import_module(name)
        out[name] = os.path.dirname(os.path.abspath(module.__file__))
    return out


# ------------------------------------------------------------------------------- the recipe's train step
class SyntheticVocab:
    """What the noise needs of a tokenizer, for synthetic rows over a model's vocabulary: BART's special ids
    (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> the last id), '.' (id 4) ends sentences, and two ids in three
    start a word (about GPT-2's share); specials count as word starts, as in the real tokenizer."""

    bos_id, pad_id, eos_id, unk_id, period_id = 0, 1, 2, 3, 4

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.mask_id = vocab_size - 1

    def sentence_end_ids(self, split: str = "punctuation") -> tuple[int, ...]:
        del split
        return (self.period_id,)

    def word_start_table(self):
        import numpy as np

        table = np.arange(self.vocab_size) % 3 != 0
        table[[self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id]] = True
        return table

    def rows(self, batch: int, length: int, seed: int = 0):
        """int32 [batch, length] packed rows `<s> text </s>` with a '.' about every 20 tokens (no padding)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        rows = rng.integers(self.period_id + 1, self.mask_id, size=(batch, length), dtype=np.int32)
        rows[rng.random((batch, length)) < 0.05] = self.period_id
        rows[:, 0], rows[:, -1] = self.bos_id, self.eos_id
        return rows


def recipe_setup(spec: dict, tokens: int) -> dict:
    """The pretraining step of run config `spec['config']` (+ overrides) for one device, built as the
    training loop builds it (bart_jax.train.setup.setup_stage) minus the data pipeline: the batch is
    {'tokens': int32 [B, tokens]} and the noise runs inside the step."""
    import flax.linen as nn
    import jax

    from bart_jax.model import param_count
    from bart_jax.train import config as C
    from bart_jax.train import optim, partitioning
    from bart_jax.train.config import load_config
    from bart_jax.train.inputs import noise_batch_fns
    from bart_jax.train.state import boxed_abstract_params, state_shardings

    cfg = load_config(spec["config"], spec["overrides"])
    t = cfg.pretrain.train
    model = cfg.model.bart_config()
    vocab = SyntheticVocab(model.vocab_size)
    train_fn, _ = noise_batch_fns(cfg, vocab, model.decoder_start_token_id)
    mesh = partitioning.make_mesh(C.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    boxed = boxed_abstract_params(model)
    optimizer, schedule = optim.make_optimizer(cfg.pretrain.optimizer, cfg.pretrain.schedule, t.steps,
                                               nn.meta.unbox(boxed), nn.get_partition_spec(boxed))
    shardings, abstract = state_shardings(model, optimizer, mesh, boxed_params=boxed)
    source = jax.eval_shape(train_fn, {"tokens": jax.ShapeDtypeStruct((1, tokens), "int32")}, 0)["input_ids"].shape[1]
    return dict(cfg=cfg, train=t, model=model, vocab=vocab, train_fn=train_fn, mesh=mesh, optimizer=optimizer,
                schedule=schedule, shardings=shardings, abstract=abstract, tokens=tokens, source=source,
                params=param_count(abstract.params))


def build_step(s: dict, model_config):
    from bart_jax.train.step import compile_train_step, make_train_step

    t = s["train"]
    return compile_train_step(
        make_train_step(model_config, s["optimizer"], s["schedule"], label_smoothing=t.label_smoothing,
                        label_smoothing_form=t.label_smoothing_form, batch_fn=s["train_fn"],
                        grad_shardings=s["shardings"].params), s["shardings"], s["mesh"])


def compile_at(s: dict, step, batch: int):
    """(compiled step for `batch` rows, compile seconds, memory by XLA's buffer assignment: {'fixed_bytes'
    (arguments + outputs - aliased), 'temp_bytes', 'peak_bytes'} or None where the backend has none)."""
    import jax

    t0 = time.perf_counter()
    compiled = step.lower(s["abstract"], {"tokens": jax.ShapeDtypeStruct((batch, s["tokens"]), "int32")}).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        return compiled, seconds, None
    fixed = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return compiled, seconds, {"fixed_bytes": fixed, "temp_bytes": m.temp_size_in_bytes,
                               "peak_bytes": fixed + m.temp_size_in_bytes}


def fresh_state(s: dict):
    from bart_jax.train.state import init_train_state

    return init_train_state(s["model"], s["optimizer"], s["mesh"], s["train"].seed, s["shardings"], s["abstract"])


def time_steps(s: dict, compiled, state, batch: int, warmup: int, steps: int, repeats: int):
    """Warm up, then `repeats` timings of `steps` steps each on random rows. Returns (timing, state)."""
    import jax
    import numpy as np

    from bart_jax.train import partitioning

    data = jax.device_put({"tokens": s["vocab"].rows(batch, s["tokens"])}, partitioning.batch_sharding(s["mesh"]))
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"the step's loss is {loss}")
    median = statistics.median(times)
    return {"step_s": median, "step_s_repeats": times, "spread": (max(times) - min(times)) / median,
            "repeats": repeats, "steps_per_repeat": steps, "loss": loss}, state


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def next_batch(points: dict, mem: dict, budget: float, grid: list[int]) -> int | None:
    """The largest grid batch whose predicted peak fits `budget`. points {batch: peak bytes} as compiled;
    with one point, peak(b) = fixed + g + b * (temp - g) / b_0, where g, the temporaries that do not grow with
    the batch (fp32 gradients, optimizer update: about two thirds of the fp32 state in `fixed`), is taken as
    min(2/3 fixed, temp/2); with more, the line through the two largest batches."""
    if len(points) == 1:
        (b0, _), = points.items()
        g = min(2 * mem["fixed_bytes"] / 3, mem["temp_bytes"] / 2)
        intercept, per_row = mem["fixed_bytes"] + g, (mem["temp_bytes"] - g) / b0
    else:
        (b1, p1), (b2, p2) = sorted(points.items())[-2:]
        per_row = (p2 - p1) / (b2 - b1)
        intercept = p2 - b2 * per_row
    fits = [b for b in grid if intercept + b * max(per_row, 0.0) <= budget]
    return max(fits) if fits else None


def pick_batches(s: dict, step, plan: dict, spec: dict, limit: int | None, deadline: float, tried: list):
    """Candidate batches, largest first, each as (batch, compiled step, compile seconds, memory): a generator,
    so the caller moves on to the next after an out-of-memory error at run time. Each compiled step's peak by
    XLA's buffer assignment is checked against plan['memory_margin'] x `limit` bytes (nothing is allocated to
    find out): the first compile is at spec['first_batch'] scaled by the limit over 72 GiB, then at most two
    more at `next_batch`'s prediction (a larger one only while the time left before `deadline` allows).
    With no limit (a CPU) or a fixed spec['batch']: that batch, then smaller ones."""
    grid = plan["batch_grid"]

    def compile_try(b):
        compiled, seconds, mem = compile_at(s, step, b)
        tried.append({"batch": b, "compile_s": seconds, **(mem or {})})
        fits = mem is None or limit is None or mem["peak_bytes"] <= plan["memory_margin"] * limit
        return compiled, seconds, mem, fits

    if limit is None or "batch" in spec:
        first = spec.get("batch", grid[0])
        for b in [first] + [b for b in reversed(grid) if b < first]:
            yield b, *compile_try(b)[:3]
        return
    budget = plan["memory_margin"] * limit
    b = max([x for x in grid if x <= spec["first_batch"] * limit / (72 * 2 ** 30)] or [grid[0]])
    points, best = {}, None
    for _ in range(3):
        try:
            compiled, seconds, mem, fits = compile_try(b)
        except Exception as e:  # noqa: BLE001 - a compiler that refuses the size: try half of it
            if not is_oom(e):
                raise
            tried.append({"batch": b, "oom": str(e).splitlines()[0][:200]})
            b = max([x for x in grid if x <= b // 2] or [grid[0]])
            continue
        if mem is None:  # no buffer assignment to read: out-of-memory errors at run time decide
            best = (b, compiled, seconds, mem)
            break
        points[b] = mem["peak_bytes"]
        if fits and (best is None or b > best[0]):
            best = (b, compiled, seconds, mem)
        del compiled
        nb = next_batch(points, mem, budget, grid)
        if nb is None or nb in points or (best and nb < best[0]):
            break
        if nb > b and time.monotonic() + 1.5 * seconds > deadline:
            break
        b = nb
    if best is not None:
        yield best
    top = best[0] if best else min(points or [b])
    for b in reversed(grid):
        if b < top:
            yield b, *compile_try(b)[:3]


def train_row(spec: dict, s: dict, batch: int, compile_s: float, mem, timing: dict, tried: list) -> dict:
    import jax

    import train as bench_train  # bench/train.py: hf_config, for the PyTorch peer's model
    from bart_jax.train import flops

    model, t, device = s["model"], s["train"], jax.devices()[0]
    step_flops = flops.train_step_flops(model, batch, s["source"], s["tokens"])
    peak = flops.device_peak(model.compute_dtype)
    stats = device.memory_stats() or {}
    return {"kind": "train", "model": spec["name"], "config": spec["config"], "overrides": spec["overrides"],
            "preset": s["cfg"].model.preset, "params": s["params"], "dtype": model.dtype,
            "param_dtype": model.param_dtype, "optimizer": s["cfg"].pretrain.optimizer.name,
            "noise": s["cfg"].noise.preset, "label_smoothing": t.label_smoothing, "dropout": model.dropout,
            "attention_dropout": model.attention_dropout, "remat_policy": model.remat_policy,
            "attention_path": "explicit" if model.attention_dropout > 0
            else model.attention_implementation_for(device.platform),
            "batch": batch, "micro_batches": 1, "config_batch_size": t.batch_size,
            "config_micro_batches": t.micro_batches, "tokens": s["tokens"], "source_length": s["source"],
            "target_length": s["tokens"], "tried": tried, "compile_s": compile_s, **timing,
            "tokens_per_s": batch * (s["source"] + s["tokens"]) / timing["step_s"],
            "model_flops_per_step": step_flops, "model_flops_per_s": step_flops / timing["step_s"],
            "peak_flops": peak.flops_per_s, "peak_source": peak.source,
            "mfu": step_flops / timing["step_s"] / peak.flops_per_s,
            "compiled_peak_bytes": mem and mem["peak_bytes"], "hbm_peak_bytes": stats.get("peak_bytes_in_use"),
            "hbm_limit_bytes": stats.get("bytes_limit"), "scale_model": spec["scale_model"],
            "hf_config": bench_train.hf_config(model)}


def has_cudnn_attention(hlo: str) -> bool:
    calls = {line.split('custom_call_target="')[1].split('"')[0].lower() for line in hlo.splitlines()
             if 'custom_call_target="' in line}
    return any("cudnn" in c and ("fmha" in c or "attention" in c) for c in calls)


def attention_row(spec: dict, s: dict, plan: dict, state, batch: int) -> dict:
    """The recipe's step with attention dropout off (with it on, attention takes the written-out path, as
    jax.nn.dot_product_attention has no dropout): timed with the default attention, then with the other of
    cuDNN fused attention / XLA attention. Which one the default picks is read from the compiled program."""
    import jax

    base = s["model"].replace(attention_dropout=0.0)
    variants = {}

    def run(label: str, model_config) -> bool:
        nonlocal state
        try:  # (tracing the model can be what fails: "cudnn" off a GPU, an unsupported mask)
            compiled, compile_s, mem = compile_at(s, build_step(s, model_config), batch)
        except Exception as e:  # noqa: BLE001 - a path that does not compile is an answer
            variants[label] = {"compiled": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            return False
        cudnn = has_cudnn_attention(compiled.as_text())
        timing, state = time_steps(s, compiled, state, batch, 1, plan["steps"], plan["attention_repeats"])
        variants[label] = {"compiled": True, "cudnn_fmha": cudnn, "compile_s": compile_s,
                           "compiled_peak_bytes": mem and mem["peak_bytes"], **timing,
                           "tokens_per_s": batch * (s["source"] + s["tokens"]) / timing["step_s"]}
        return cudnn

    resolved = base.attention_implementation_for(jax.devices()[0].platform)
    picks = "cudnn" if run("default", base) else ("xla" if resolved == "auto" else resolved)
    other = "xla" if picks == "cudnn" else "cudnn"
    run(other, base.replace(attention_implementation=other))
    return {"kind": "attention", "model": spec["name"], "batch": batch, "source_length": s["source"],
            "target_length": s["tokens"], "default_picks": picks, "default_setting": resolved,
            "recipe_path": "explicit (attention dropout on)", "variants": variants}


def worker_train(spec: dict, plan: dict, deadline: float) -> None:
    """The recipe's train step for one run config at the largest batch that fits (see the module doc), then
    with spec['attention'] the attention paths at that batch. Prints each row as soon as it is measured."""
    import gc

    import jax

    s = recipe_setup(spec, plan["tokens"])
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    tried = []
    for batch, compiled, compile_s, mem in pick_batches(s, build_step(s, s["model"]), plan, spec, limit, deadline,
                                                        tried):
        try:
            timing, state = time_steps(s, compiled, fresh_state(s), batch, plan["warmup"], plan["steps"],
                                       plan["repeats"])
        except Exception as e:  # noqa: BLE001 - only out-of-memory moves on to a smaller batch
            if not is_oom(e):
                raise
            tried.append({"batch": batch, "oom": str(e).splitlines()[0][:200]})
            del compiled
            gc.collect()
            continue
        break
    else:
        raise RuntimeError(f"no batch fits: {tried}")
    print(ROW + json.dumps(train_row(spec, s, batch, compile_s, mem, timing, tried)), flush=True)
    del compiled
    if spec.get("attention"):
        try:
            row = attention_row(spec, s, plan, state, batch)
        except Exception as e:  # noqa: BLE001 - reported by the parent as the attention stage's failure
            traceback.print_exc()
            row = {"kind": "attention", "model": spec["name"], "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(ROW + json.dumps(row), flush=True)


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    plan, seconds = spec.pop("plan"), spec.pop("seconds")
    worker_train(spec, plan, time.monotonic() + min(seconds, spec.get("search_s", seconds)))
    return 0


# ------------------------------------------------------------------------------------- child processes
def run_child(argv: list[str], timeout: float, env: dict) -> tuple[list[dict], str | None]:
    """(result rows, None or why it failed) of a child; its other output is echoed, indented."""
    try:
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        out, error = proc.stdout, None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out, error = e.stdout or b"", f"timed out after {timeout:.0f}s"
    rows, tail = [], []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(ROW):
            rows.append(json.loads(line[len(ROW):]))
        else:
            print("    " + line, flush=True)
            tail.append(line)
    if error and tail:
        error += ": " + tail[-1][:300]
    return rows, error


def run_worker(spec: dict, plan: dict, seconds: float, env: dict):
    argv = [sys.executable, os.path.abspath(__file__), "--worker",
            json.dumps({**spec, "plan": plan, "seconds": seconds})]
    return run_child(argv, seconds + 30, env)


class ScalePrediction(threading.Thread):
    """bench/scale.py's single-device prediction (XLA:CPU ahead-of-time compile, in its own subprocess) of
    a train shape, computed while the GPU stages run."""

    def __init__(self, case: dict, timeout: float):
        super().__init__(daemon=True)
        self.case, self.timeout, self.result = case, timeout, None

    @staticmethod
    def case_of(row: dict) -> dict:
        return dict(name=row["scale_model"], layout=[1, 1, 1], per_shard_batch=row["batch"],
                    source=row["source_length"], target=row["target_length"], micro=1)

    def run(self):
        import scale  # bench/scale.py

        os.nice(10)  # this thread, and so the compile it starts, yields the CPUs to the measurements
        rows = scale.run_device_count(1, [self.case], self.timeout)
        self.result = rows[0] if rows else {"error": "no result (timed out or failed)"}


# ------------------------------------------------------------------------------ stages in this process
def random_batch(config, batch: int, source: int, target: int, min_source: int, seed: int = 0):
    """Random ids with varied real lengths: sources in [min_source, source], targets in [target//2, target],
    `<s> ... </s>` then pad. Returns (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)."""
    import numpy as np

    from bart_jax.model import shift_tokens_right

    rng = np.random.default_rng(seed)

    def rows(n, length, low):
        lengths = np.linspace(low, length, n).astype(int)
        lengths[-1] = length  # the longest row fills the width
        ids = rng.integers(4, config.vocab_size - 1, size=(n, length)).astype(np.int32)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        ids[:, 0] = config.bos_token_id
        ids[np.arange(n), lengths - 1] = config.eos_token_id
        return np.where(mask == 1, ids, config.pad_token_id).astype(np.int32), mask

    ids, mask = rows(batch, source, min_source)
    labels, dmask = rows(batch, target, max(2, target // 2))
    dec = np.asarray(shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id))
    return ids, mask, dec, dmask


def _diff(a, b, mask) -> dict:
    import numpy as np

    d = np.abs(a - b)[mask]
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1))[mask].mean())}


def stage_logits(plan: dict, report: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bart_jax import Bart, from_pretrained, init_params, preset

    p = plan["logits"]
    config = preset(p["preset"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    params = init_params(config, jax.random.PRNGKey(0))  # fp32
    inputs = [jnp.asarray(x) for x in random_batch(config, p["batch"], p["source"], p["target"], p["source"] // 2)]

    def logits(dtype: str, precision: str):
        model = Bart(config.replace(dtype=dtype))
        with jax.default_matmul_precision(precision):
            fn = jax.jit(lambda params, *x: model.apply({"params": params}, *x, deterministic=True))
            return np.asarray(fn(params, *inputs), np.float64)

    reference = logits("float32", "highest")
    mask = np.asarray(inputs[3], bool)
    random_row = {"model": f"{p['preset']} shape, random weights", "batch": p["batch"], "source": p["source"],
                  "target": p["target"], "logit_scale": float(np.abs(reference[mask]).max()),
                  "bf16_vs_fp32_highest": _diff(logits("bfloat16", "default"), reference, mask),
                  "fp32_default_vs_fp32_highest": _diff(logits("float32", "default"), reference, mask)}

    path = os.path.join(ROOT, "tests", "fixtures", "bart_default")
    ref = np.load(os.path.join(path, "reference.npz"))
    fx_inputs = [jnp.asarray(ref[k], jnp.int32) for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                                           "decoder_attention_mask")]
    fx = {}
    for dtype in ("float32", "bfloat16"):
        fx_config, fx_params = from_pretrained(path, dtype=dtype, param_dtype="float32", dropout=0.0,
                                               attention_dropout=0.0, activation_dropout=0.0)
        with jax.default_matmul_precision("highest"):
            fx[dtype] = np.asarray(Bart(fx_config).apply({"params": fx_params}, *fx_inputs, deterministic=True),
                                   np.float64)
    fx_mask = np.asarray(ref["decoder_attention_mask"], bool)
    fx_ref = np.asarray(ref["logits"], np.float64)
    report["logits"] = {"random": random_row,
                        "fixture": {"fixture": "tests/fixtures/bart_default",
                                    "fp32_vs_reference": _diff(fx["float32"], fx_ref, fx_mask),
                                    "bf16_vs_reference": _diff(fx["bfloat16"], fx_ref, fx_mask)}}
    b, t = random_row["bf16_vs_fp32_highest"], random_row["fp32_default_vs_fp32_highest"]
    print(f"logits ({random_row['model']}, |logit| <= {random_row['logit_scale']:.2f}) vs fp32 TF32-off: bf16 max "
          f"{b['max_abs']:.2e} mean {b['mean_abs']:.2e} argmax {b['argmax_agreement']:.4f}; fp32 default precision "
          f"max {t['max_abs']:.2e} argmax {t['argmax_agreement']:.4f}; fixture fp32 vs HF max "
          f"{report['logits']['fixture']['fp32_vs_reference']['max_abs']:.1e}", flush=True)


def stage_xsum(plan: dict, report: dict, share_dir: str | None) -> None:
    """bart_jax beam search at the XSum shape; with `share_dir`, its weights and inputs for the peer."""
    import jax
    import numpy as np

    from bart_jax import init_params, preset, save_pretrained
    from bart_jax.decode.generate import generate, load_generation_preset, resolve_controls

    p = plan["xsum"]
    config = preset(p["preset"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dtype="bfloat16",
                    param_dtype="bfloat16")
    params = init_params(config, jax.random.PRNGKey(0))
    ids, mask, _, _ = random_batch(config, p["batch"], p["source"], 2, p["min_source"])
    controls = {**load_generation_preset("xsum"), **p["controls"]}
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(config, params, ids, mask, **controls))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        out = jax.block_until_ready(generate(config, params, ids, mask, **controls))
        times.append(time.perf_counter() - t0)
    best = np.asarray(out.sequences[:, 0])
    lengths = (best[:, 1:] != config.pad_token_id).sum(-1)
    seconds = statistics.median(times)
    resolved = resolve_controls(config, **controls)
    hf_controls = {k: getattr(resolved, k) for k in (
        "num_beams", "max_length", "min_length", "no_repeat_ngram_size", "length_penalty", "forced_bos_token_id",
        "forced_eos_token_id", "decoder_start_token_id", "pad_token_id")}
    hf_controls.update(early_stopping=controls.get("early_stopping", False), eos_token_id=config.eos_token_id,
                       bos_token_id=config.bos_token_id)
    hf_controls = {k: (v.item() if hasattr(v, "item") else v) for k, v in hf_controls.items()}
    for k in ("forced_bos_token_id", "forced_eos_token_id"):  # SearchControls encodes "off" as -1
        hf_controls[k] = None if hf_controls[k] == -1 else hf_controls[k]
    row = {"model": f"{p['preset']} shape, random weights, bf16", "batch": p["batch"], "source_width": p["source"],
           "source_lengths": mask.sum(-1).tolist(), "controls": hf_controls, "first_call_s": first_s,
           "seconds": seconds, "seconds_repeats": times, "sequences_per_s": p["batch"] / seconds,
           "generated_lengths": lengths.tolist(), "nvidia_a100_seq_per_s": NVIDIA_A100_XSUM_SEQ_PER_S,
           "ratio_vs_nvidia_a100": p["batch"] / seconds / NVIDIA_A100_XSUM_SEQ_PER_S}
    report["xsum"] = row
    print(f"xsum: beam {hf_controls['num_beams']} batch {p['batch']} sources {min(row['source_lengths'])}-"
          f"{max(row['source_lengths'])} of {p['source']}, lengths {hf_controls['min_length']}-"
          f"{hf_controls['max_length']}: {row['sequences_per_s']:.2f} seq/s (first call {first_s:.1f}s incl. "
          f"compile; mean generated length {lengths.mean():.1f}; NVIDIA's A100 figure {NVIDIA_A100_XSUM_SEQ_PER_S}, "
          f"context only)", flush=True)
    if share_dir:
        save_pretrained(os.path.join(share_dir, "model"), config, params)
        np.savez(os.path.join(share_dir, "inputs.npz"), input_ids=ids, attention_mask=mask)


def stage_peer(plan: dict, report: dict, args, share_dir: str, env: dict, seconds: float) -> str | None:
    """The PyTorch peer in its own process; returns a reason when it is skipped."""
    probe = subprocess.run([args.torch_python, "-c", "import torch, transformers"], env=env, capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"torch/transformers not importable by {args.torch_python}"
    import jax

    spec = {"device": "cuda" if jax.devices()[0].platform == "gpu" else "cpu", "train": [], "generate": None}
    for row in report.get("train", []):
        if "batch" in row:
            spec["train"].append({"model": row["model"], "hf_config": row["hf_config"], "batch": row["batch"],
                                  "source": row["source_length"], "target": row["target_length"],
                                  "warmup": plan["warmup"], "steps": plan["steps"], "repeats": plan["peer_repeats"],
                                  "lr": 1e-4})
    if report.get("xsum") and os.path.exists(os.path.join(share_dir, "inputs.npz")):
        spec["generate"] = {"model_dir": os.path.join(share_dir, "model"),
                            "inputs": os.path.join(share_dir, "inputs.npz"),
                            "controls": report["xsum"]["controls"], "repeats": plan["xsum"]["repeats"]}
    spec_path = os.path.join(share_dir, "peer.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    rows, error = run_child([args.torch_python, os.path.join(HERE, "gpu_peer_torch.py"), spec_path], seconds, env)
    report["peer"] = {"train": [r for r in rows if r["kind"] == "peer_train"],
                      "generate": next((r for r in rows if r["kind"] == "peer_generate"), None)}
    for r in report["peer"]["train"]:
        ours = next((t for t in report["train"] if t["model"] == r["model"]), None)
        if "tokens_per_s" in r and ours:
            r["bart_jax_speedup"] = ours["tokens_per_s"] / r["tokens_per_s"]
    gen = report["peer"]["generate"]
    if gen and "sequences_per_s" in gen:
        gen["bart_jax_speedup"] = report["xsum"]["sequences_per_s"] / gen["sequences_per_s"]
    print("peer (PyTorch): " + "; ".join(
        f"{r['model']} train batch {r.get('batch')}: {r.get('tokens_per_s', 0):.0f} tokens/s" if "error" not in r
        else f"{r['model']} train failed: {r['error'][:200]}" for r in report["peer"]["train"])
        + ("" if gen is None else f"; generate: {gen.get('sequences_per_s', 0):.2f} seq/s" if "error" not in gen
           else f"; generate failed: {gen['error'][:200]}"), flush=True)
    if error or any("error" in r for r in rows):
        raise RuntimeError(error or "a peer case failed (see its row)")
    return None


# ------------------------------------------------------------------------------------------- the table
def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.1f}"


def print_table(report: dict) -> None:
    print(f"\n{report['device']} ({report['platform']}), jax {report['jax']}; train: bf16 compute, fp32 master "
          f"weights and LAMB state; MFU against {next((r['peak_source'] for r in report.get('train', []) if 'peak_source' in r), 'n/a')}")
    head = (f"{'model':<7} {'batch':>5} {'src+tgt':>8} {'step s':>7} {'spread':>6} {'tokens/s':>9} {'TFLOP/s':>8} "
            f"{'MFU':>6} {'HBM GiB':>7} {'XLA GiB':>7} {'scale GiB':>9} {'torch tok/s':>11} {'vs torch':>8}")
    print(head + "\n" + "-" * len(head))
    peers = {r["model"]: r for r in (report.get("peer") or {}).get("train", [])}
    for r in report.get("train", []):
        if "step_s" not in r:
            print(f"{r['model']:<7} failed: {r.get('error', '')[:100]}")
            continue
        peer = peers.get(r["model"], {})
        pred = (r.get("scale_prediction") or {}).get("peak_bytes")
        print(f"{r['model']:<7} {r['batch']:>5} {r['source_length']:>4}+{r['target_length']:<3} {r['step_s']:>7.3f} "
              f"{100 * r['spread']:>5.1f}% {r['tokens_per_s']:>9.0f} {r['model_flops_per_s'] / 1e12:>8.1f} "
              f"{100 * r['mfu']:>5.1f}% {_gib(r['hbm_peak_bytes']):>7} {_gib(r['compiled_peak_bytes']):>7} "
              f"{_gib(pred):>9} {peer.get('tokens_per_s', float('nan')):>11.0f} "
              f"{peer.get('bart_jax_speedup', float('nan')):>7.2f}x")
    a = report.get("attention")
    if a and "error" in a:
        print(f"attention: failed: {a['error'][:200]}")
    elif a:
        print(f"attention (bart-base step, attention dropout off): default picks {a['default_picks']}; " + "; ".join(
            f"{k}: {v['step_s']:.3f} s/step" if v.get("compiled") else f"{k}: does not compile ({v['error'][:80]})"
            for k, v in a["variants"].items()))
    x = report.get("xsum")
    if x:
        gen = (report.get("peer") or {}).get("generate") or {}
        print(f"xsum beam search: bart_jax {x['sequences_per_s']:.2f} seq/s, PyTorch "
              f"{gen.get('sequences_per_s', float('nan')):.2f} seq/s (NVIDIA A100 figure {NVIDIA_A100_XSUM_SEQ_PER_S}, "
              f"context only)")


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(HERE, "out"),
                                                      "gpu_check.json"))
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="skip any stage that would start after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (for CPU, to keep the script working)")
    parser.add_argument("--stages", default=",".join(STAGE_BITS), help=f"comma list of {list(STAGE_BITS)}")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="python with torch + transformers for the peer (default: this one)")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGE_BITS):
        parser.error(f"--stages: expected some of {list(STAGE_BITS)}, got {stages}")

    missing = missing_modules()
    if missing:
        return fail(f"missing python modules: {', '.join(missing)} (bench/wheels/README.md says what travels; "
                    "run through bench/gpu_check.sh)")
    child_env = dict(os.environ)
    # This process takes GPU memory only as it needs it: the children measure with the rest.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    from bart_jax.train.flops import datasheet_peaks

    device = jax.devices()[0]
    if device.platform != "gpu" and not args.smoke:
        return fail(f"the JAX backend is {device.platform}, not a GPU (jax {jax.__version__}; is the CUDA plugin "
                    f"installed and loading?); --smoke runs tiny shapes on a CPU")

    start = time.monotonic()
    plan = SMOKE if args.smoke else FULL
    report = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
              "jax": jax.__version__, "python": sys.version.split()[0], "smoke": args.smoke,
              "peak_tflops": datasheet_peaks(device.device_kind), "modules": module_origins(), "stages": {}}
    print(f"gpu_check: {device.device_kind} ({device.platform}) x{jax.device_count()}, jax {jax.__version__}, "
          f"budget {args.budget_s:.0f}s{' (smoke: tiny shapes)' if args.smoke else ''}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    left = lambda: max(30.0, args.budget_s + 20 - (time.monotonic() - start))  # noqa: E731
    predictions: dict[str, ScalePrediction] = {}  # by the case's JSON: one compile per distinct shape
    share = tempfile.TemporaryDirectory(prefix="gpu_check_")

    def train_children(specs, with_attention: bool):
        """One child per run config; the first config's child also times the attention paths when asked, and
        runs last, so a slow attention comparison cannot cost another model's train step."""
        report.setdefault("train", [])
        errors = []
        specs = [{**spec, "attention": with_attention and i == 0} for i, spec in enumerate(specs)]
        for spec in sorted(specs, key=lambda spec: spec["attention"]):
            rows, error = run_worker(spec, plan, left(), child_env)
            if spec["attention"]:
                report["attention"] = next((r for r in rows if r["kind"] == "attention"), None) or {
                    "kind": "attention", "model": spec["name"], "error": error or "no result"}
            trained = [r for r in rows if r["kind"] == "train"]
            if not trained:
                trained = [{"kind": "train", "model": spec["name"], "error": error or "no result"}]
                errors.append(f"{spec['name']}: {error}")
            for row in trained:
                report["train"].append(row)
                if "batch" not in row:
                    continue
                print(f"train {row['model']} ({row['preset']}, {row['optimizer']}, noise {row['noise']}): batch "
                      f"{row['batch']} x {row['source_length']}+{row['target_length']}, {row['step_s']:.3f} s/step "
                      f"(spread {100 * row['spread']:.1f}% over {row['repeats']}), {row['tokens_per_s']:.0f} "
                      f"tokens/s, MFU {100 * row['mfu']:.1f}% vs {row['peak_source']}; HBM peak "
                      f"{_gib(row['hbm_peak_bytes'])} GiB, XLA's buffers {_gib(row['compiled_peak_bytes'])} GiB",
                      flush=True)
        order = [spec["name"] for spec in specs]
        report["train"].sort(key=lambda row: order.index(row["model"]) if row["model"] in order else len(order))
        # After the train children, so the CPU compiles do not slow theirs.
        for row in report["train"]:
            case = ScalePrediction.case_of(row) if "batch" in row else None
            if case and json.dumps(case) not in predictions:
                predictions[json.dumps(case)] = ScalePrediction(case, timeout=max(60.0, left()))
                predictions[json.dumps(case)].start()
        if errors:
            raise RuntimeError("; ".join(errors))

    def attention():
        if "attention" not in report:  # the train stage did not run (it times the attention paths too)
            train_children(plan["train"][:1], True)
        a = report["attention"]
        if "error" in a:
            raise RuntimeError(a["error"])
        print(f"attention at batch {a['batch']}: default picks {a['default_picks']}; " + "; ".join(
            f"{k}: {v['step_s']:.3f} s/step" if v.get("compiled") else f"{k}: does not compile"
            for k, v in a["variants"].items()), flush=True)

    def peer():
        why = stage_peer(plan, report, args, share.name, child_env, left())
        if why:
            raise _Skipped(why)

    run = {"train": lambda: train_children(plan["train"], "attention" in stages), "attention": attention,
           "logits": lambda: stage_logits(plan, report),
           "xsum": lambda: stage_xsum(plan, report, share.name if "peer" in stages else None), "peer": peer}
    failed = 0
    for name in stages:
        elapsed = time.monotonic() - start
        if elapsed > args.budget_s:
            report["stages"][name] = f"skipped: budget of {args.budget_s:.0f}s spent"
            print(f"{name}: skipped (budget spent)", flush=True)
            continue
        t0 = time.monotonic()
        try:
            run[name]()
            report["stages"][name] = f"ok in {time.monotonic() - t0:.1f}s"
        except _Skipped as e:
            report["stages"][name] = f"skipped: {e}"
            print(f"{name}: skipped: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - one stage's failure must not lose the others
            failed |= STAGE_BITS[name]
            report["stages"][name] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            print(f"{name}: FAILED", flush=True)
            traceback.print_exc()
        write(report, args.out)
    for p in predictions.values():
        p.join(timeout=max(1.0, args.budget_s + 20 - (time.monotonic() - start)))
    for row in report.get("train", []):
        if "batch" in row:
            p = predictions[json.dumps(ScalePrediction.case_of(row))]
            row["scale_prediction"] = p.result or {"error": "not finished within the budget"}
    share.cleanup()
    try:
        print_table(report)
    except Exception:  # noqa: BLE001 - the JSON below holds everything the table would show
        traceback.print_exc()
    write(report, args.out)
    failures = [n for n, bit in STAGE_BITS.items() if failed & bit]
    print(f"wrote {args.out} ({time.monotonic() - start:.0f}s)"
          + (f"; failed: {', '.join(failures)} (exit status {failed})" if failed else ""))
    return failed


class _Skipped(Exception):
    """A stage that cannot run here (not a failure): the reason is reported."""


def write(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
