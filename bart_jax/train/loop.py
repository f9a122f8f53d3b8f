"""The training loops: `pretrain(cfg)` (denoising) and `finetune(cfg)` (document -> summary), one shared
train step, and their command lines `bart-jax pretrain|finetune --config FILE [key=value ...]`.

A run lives in `<workdir>/<run_name>/`: `checkpoints/` (orbax, see bart_jax.train.checkpoint), `tb/`
(TensorBoard events) and, when training completes, `model/` (final parameters as a bart_jax model
directory, `bart_jax.from_pretrained`-loadable, plus the tokenizer). Re-running the same command resumes
from the latest checkpoint: parameters, optimizer, step, PRNG and data-iterator position, so the losses
continue exactly as if the run had not stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.config import BartConfig
from bart_jax.errors import Interrupted, Terminated, UserError
from bart_jax.train import checkpoint as ckpt_lib
from bart_jax.train import flops as flops_lib
from bart_jax.train import optim, partitioning
from bart_jax.train.config import RunConfig, check_run_config, load_config
from bart_jax.train.prior import target_log_prior, with_logits_bias
from bart_jax.train.state import abstract_params, create_train_state, state_shardings
from bart_jax.train.step import (compile_eval_step, compile_train_step, identity_batch, make_eval_step,
                                 make_train_step, summarize_eval)

# BartConfig fields that do not change parameter shapes: a run may set them freely when it starts from a
# checkpoint whose architecture it inherits.
ARCH_NEUTRAL_FIELDS = frozenset({
    "dropout", "attention_dropout", "activation_dropout", "dtype", "param_dtype", "remat_policy", "scan_layers",
    "attention_implementation", "forced_bos_token_id", "forced_eos_token_id", "decode_layout"})
EVAL_NOISE_SEED_OFFSET = 7919  # eval batches are noised by a fixed stream, distinct from training's

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when `max_nonfinite` consecutive steps had a NaN/inf loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) run returns.

    final_step: steps done (== checkpointed step when completed). losses: training loss of every step
    this invocation ran, in order (host floats). eval_metrics: the last validation metrics (or {}).
    run_dir / checkpoint_dir / model_dir (None unless the run completed) / tokenizer_dir: where things are.
    best_step: best kept checkpoint by validation metric (else latest). resumed_from: step restored at
    start (None: fresh). model_config: the BartConfig trained.
    """

    stage: str
    final_step: int
    losses: list[float]
    eval_metrics: dict[str, float]
    run_dir: str
    checkpoint_dir: str
    model_dir: str | None
    tokenizer_dir: str
    best_step: int | None
    resumed_from: int | None
    nonfinite_total: int
    model_config: BartConfig


# ------------------------------------------------------------------------------------------ entry points
def pretrain(cfg: RunConfig, *, stop_at_step: int | None = None, allow_config_change: bool = False) -> TrainResult:
    """Denoising pretraining: clean {'tokens'} batches are noised on device inside the train step.

    stop_at_step: return once the global step reaches this value without writing a final checkpoint
    (what a preempted job leaves behind); rerunning resumes from the last checkpoint.
    allow_config_change: resume even when training settings (`RESUME_CHECKED_KEYS`) differ from the
    checkpoint's, logging what changed; otherwise that is a ValueError.
    """
    return run_stage(cfg, "pretrain", stop_at_step=stop_at_step, allow_config_change=allow_config_change)


def finetune(cfg: RunConfig, *, stop_at_step: int | None = None, allow_config_change: bool = False) -> TrainResult:
    """Fine-tuning on document -> summary pairs, initialised from `cfg.finetune.init_from` (arguments as
    for `pretrain`)."""
    return run_stage(cfg, "finetune", stop_at_step=stop_at_step, allow_config_change=allow_config_change)


def cli_pretrain(argv: list[str]) -> int:
    return _cli("pretrain", argv)


def cli_finetune(argv: list[str]) -> int:
    return _cli("finetune", argv)


def _cli(stage: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"bart-jax {stage}",
        description=f"{stage} BART. Overrides are dotted keys of the run config, e.g. {stage}.train.steps=100 "
                    "model.dtype=bfloat16 mesh.fsdp=4.")
    parser.add_argument("--config", help="run config: a bundled name (tiny, base, large) or a YAML path")
    parser.add_argument("--variant", help="named bundle of overrides from the config's `variants` section")
    parser.add_argument("--allow-config-change", action="store_true", help=ALLOW_CONFIG_CHANGE_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    # User errors (config, data, paths) reach the `bart-jax` dispatcher: one line, exit code 2.
    cfg = load_config(args.config, args.overrides, args.variant)
    check_run_config(cfg, (stage,))
    try:
        result = run_stage(cfg, stage, allow_config_change=args.allow_config_change)
    except TrainingDiverged as e:
        print(f"bart-jax {stage}: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps({"stage": stage, "final_step": result.final_step,
                          "last_loss": result.losses[-1] if result.losses else None,
                          "eval": result.eval_metrics, "checkpoints": result.checkpoint_dir,
                          "best_step": result.best_step, "model_dir": result.model_dir}))
    return 0


# ------------------------------------------------------------------------------------------ set-up pieces
def initialize_distributed(cfg: RunConfig) -> None:
    """jax.distributed.initialize once per process when `distributed.enabled` (one process per host)."""
    d = cfg.distributed
    if d.enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)


TOKENIZER_PROVENANCE_FILE = "trained_from.json"
_PROVENANCE_LABELS = {"pretrain_source": "data.pretrain_source", "tokenizer_vocab_size": "data.tokenizer_vocab_size",
                      "dataset_fingerprint": "the pretraining dataset's content fingerprint"}


def _tokenizer_provenance(cfg: RunConfig) -> dict:
    """What a workdir tokenizer is trained from: the pretraining source (a prepared dataset also by its
    content fingerprint) and the vocabulary size."""
    source = cfg.data.pretrain_source
    out = {"pretrain_source": source, "tokenizer_vocab_size": cfg.data.tokenizer_vocab_size}
    if source != "builtin":
        out["pretrain_source"] = os.path.abspath(source)
        try:
            with open(os.path.join(source, "metadata.json")) as f:
                out["dataset_fingerprint"] = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            pass  # not a prepared dataset: `prepared_dataset` says so when it is opened
    return out


def _check_tokenizer_provenance(cfg: RunConfig, directory: str) -> None:
    """Refuse a workdir tokenizer trained from another source or with another vocabulary size."""
    path = os.path.join(directory, TOKENIZER_PROVENANCE_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        logger.warning("%s has no %s (trained by an older bart_jax): cannot check that it matches "
                       "data.pretrain_source and data.tokenizer_vocab_size", directory, TOKENIZER_PROVENANCE_FILE)
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete {directory} to retrain the tokenizer") from None
    wanted = _tokenizer_provenance(cfg)
    differ = [k for k in wanted if k in stored and stored[k] != wanted[k]]
    if differ:
        def show(d):
            return ", ".join(f"{_PROVENANCE_LABELS[k]}={d.get(k)!r}" for k in differ)

        raise ValueError(
            f"the tokenizer in {directory} was trained with {show(stored)}, but this run has {show(wanted)}; "
            f"delete {directory} to train a new one, or set data.tokenizer={directory} to use it as it is")


def load_or_train_tokenizer(cfg: RunConfig):
    """`data.tokenizer` if set; else the tokenizer in `<workdir>/tokenizer`, trained there on the
    pretraining corpus's train split the first time. What it was trained from (source, vocabulary size) is
    recorded beside it in `trained_from.json`; a later run configured otherwise is refused (ValueError)."""
    from bart_jax.data import load_tokenizer, train_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
    directory = os.path.join(cfg.workdir, "tokenizer")
    try:
        tok = load_tokenizer(directory)
    except FileNotFoundError:
        pass
    else:
        _check_tokenizer_provenance(cfg, directory)
        return tok, directory
    if jax.process_count() > 1:
        raise ValueError("multi-host runs need data.tokenizer (a tokenizer trained beforehand); training one "
                         "in every process would race on the shared workdir")
    tok = train_tokenizer(_tokenizer_texts(cfg), cfg.data.tokenizer_vocab_size, directory,
                          seed=cfg.data.shuffle_seed)
    tmp = os.path.join(directory, TOKENIZER_PROVENANCE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_tokenizer_provenance(cfg), f, indent=1)
    os.replace(tmp, os.path.join(directory, TOKENIZER_PROVENANCE_FILE))
    return tok, directory


def _tokenizer_texts(cfg: RunConfig):
    if cfg.data.pretrain_source == "builtin":
        from bart_jax.data import builtin_documents

        return builtin_documents()["train"]
    source = prepared_dataset(cfg, "pretrain")[cfg.data.train_split]
    return (_text(source[i]["text"]) for i in range(len(source)))


def _text(value) -> str:
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def prepared_dataset(cfg: RunConfig, stage: str):
    """The prepared dataset (split -> random-access source) of a stage's data source."""
    from bart_jax.data import load_prepared, prepare_builtin

    source = cfg.data.pretrain_source if stage == "pretrain" else cfg.data.finetune_source
    if source == "builtin":
        return prepare_builtin(os.path.join(cfg.workdir, "data"), "documents" if stage == "pretrain" else "pairs")
    if not os.path.isdir(source):
        raise ValueError(f"data.{stage}_source={source!r}: not 'builtin' nor a prepared dataset directory "
                         "(build one with `bart-jax data text|pairs`)")
    return load_prepared(source)


def _merge_model_config(base: BartConfig, cfg: RunConfig, where: str) -> BartConfig:
    """The checkpoint's architecture with this run's architecture-neutral `model.*` overrides applied."""
    overrides = dict(cfg.model.overrides)
    for k, v in overrides.items():
        if k not in ARCH_NEUTRAL_FIELDS and getattr(base, k) != v:
            raise ValueError(f"model.{k}={v!r} conflicts with {where} ({k}={getattr(base, k)!r}); the "
                             "architecture comes from the checkpoint")
    return base.replace(**{k: v for k, v in overrides.items() if k in ARCH_NEUTRAL_FIELDS})


def resolve_init_from(cfg: RunConfig, init_from: str) -> str:
    """'run:NAME' -> `<workdir>/NAME/checkpoints`; a path as given."""
    if init_from.startswith("run:"):
        return os.path.join(cfg.workdir, init_from[4:], "checkpoints")
    return init_from


def model_config_and_init(cfg: RunConfig, stage: str):
    """(BartConfig, init) where init(abstract_params, param_shardings) -> initial params or None (random)."""
    init_from = cfg.stage(stage).init_from
    if not init_from:
        return cfg.model.bart_config(), lambda abstract, shardings: None
    path = resolve_init_from(cfg, init_from)
    if ckpt_lib.is_training_checkpoint(path):
        stored = _stored_model_config(ckpt_lib.read_checkpoint_config(path), path)
        model_config = _merge_model_config(stored, cfg, f"the checkpoint at {path}")
        return model_config, lambda abstract, shardings: ckpt_lib.restore_params(path, abstract, shardings)
    if not os.path.exists(path):
        raise ValueError(f"{stage}.init_from={init_from!r}: {path} does not exist")
    from bart_jax.convert import from_pretrained

    base, _ = _load_pretrained_config(path)
    model_config = _merge_model_config(base, cfg, f"the pretrained model at {path}")

    def init(abstract, shardings):
        _, params = from_pretrained(path, **{k: getattr(model_config, k) for k in ARCH_NEUTRAL_FIELDS})
        return params

    return model_config, init


def _load_pretrained_config(path: str):
    from bart_jax import convert

    kind = convert.detect_format(path)
    if kind == "hf":
        return BartConfig.from_hf_config(path), kind
    config, _ = convert.from_pretrained(path)  # bart_jax / fairseq: the config comes with the weights
    return config, kind


def _vocab_check(model_config: BartConfig, tok) -> None:
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                         f"{model_config.vocab_size}; set model.vocab_size={tok.vocab_size}")


# ------------------------------------------------------------------------------------------ data
def stage_batches(cfg: RunConfig, stage: str, tok, dataset, local_batch: int, split: str, *, shuffle: bool,
                   num_epochs=None, decoder_start_id: int | None = None, whole_split: bool = False):
    """The stage's batches of `split`: this process's shard, or with `whole_split` the same batches in every
    process (read from the whole split, as a one-process run would)."""
    from bart_jax.data import finetune_batches, pretrain_batches

    t = cfg.stage(stage).train
    shard = dict(process_index=0, process_count=1) if whole_split else {}
    if stage == "pretrain":
        return pretrain_batches(dataset[split], tok, seq_len=t.source_length, batch_size=local_batch,
                                seed=cfg.data.shuffle_seed, shuffle=shuffle, num_epochs=num_epochs,
                                num_workers=cfg.data.num_workers, **shard)
    # Bucketed shapes differ between processes, and a global batch needs the same local shape everywhere.
    return finetune_batches(dataset[split], tok, max_source_len=t.source_length, max_target_len=t.target_length,
                            batch_size=local_batch, seed=cfg.data.shuffle_seed, shuffle=shuffle,
                            num_epochs=num_epochs, bucket=jax.process_count() == 1 or whole_split,
                            num_workers=cfg.data.num_workers, decoder_start_id=decoder_start_id, **shard)


def noise_batch_fns(cfg: RunConfig, tok):
    """(train batch_fn, eval batch_fn) that noise {'tokens'} on device with keys from (seed, index)."""
    from bart_jax import noise

    overrides = dict(cfg.noise.overrides)
    # The preset (or an override) says which tokens end sentences: fairseq's recipe splits at '.' only.
    split = overrides.get("sentence_split", noise.noise_preset(cfg.noise.preset).sentence_split)
    derived = dict(sentence_end_ids=tuple(tok.sentence_end_ids(split)), mask_id=tok.mask_id, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, eos_id=tok.eos_id)
    noise_cfg = noise.noise_preset(cfg.noise.preset, **{**derived, **overrides})
    word_starts = jnp.asarray(tok.word_start_table())
    seed = cfg.pretrain.train.seed

    def train_fn(batch, step):
        return noise.denoising_batch(noise.noise_key(seed, step), batch["tokens"], word_starts, noise_cfg)

    def eval_fn(batch, index):
        return noise.denoising_batch(noise.noise_key(seed + EVAL_NOISE_SEED_OFFSET, index), batch["tokens"],
                                     word_starts, noise_cfg)

    return train_fn, eval_fn


# ------------------------------------------------------------------------------------------ the loop
class _Meter:
    """Throughput (source + target positions, padding included) and MFU since the last report."""

    def __init__(self, model_config: BartConfig, peak: float):
        self.model_config, self.peak = model_config, peak
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def tick(self, batch: int, source_length: int, target_length: int):
        self.tokens += batch * (source_length + target_length)
        self.flops += flops_lib.train_step_flops(self.model_config, batch, source_length, target_length)

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "mfu": self.flops / dt / self.peak if self.peak > 0 else 0.0}
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0
        return out


def _peak_flops(model_config: BartConfig, t) -> float:
    if t.peak_flops_per_device is not None:
        peak = flops_lib.Peak(t.peak_flops_per_device, "train.peak_flops_per_device")
    else:
        peak = flops_lib.device_peak(model_config.compute_dtype)
    logger.info("MFU is against %.4g FLOP/s per device (%s) x %d devices", peak.flops_per_s, peak.source,
                jax.device_count())
    return peak.flops_per_s * jax.device_count()


def _writer(run_dir: str):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(run_dir, "tb"))


def _global_shape(local: dict, stage: str) -> tuple[int, int, int]:
    """(global batch rows, source length, target length) of a local batch."""
    rows = next(iter(local.values())).shape[0] * jax.process_count()
    if stage == "pretrain":
        length = local["tokens"].shape[1]
        return rows, length, length
    return rows, local["input_ids"].shape[1], local["labels"].shape[1]


def _host_metrics(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _gather_params(params):
    """Parameters as host numpy arrays on every process (for exporting the model)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(params))
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def run_stage(cfg: RunConfig, stage: str, *, stop_at_step: int | None = None,
              allow_config_change: bool = False) -> TrainResult:
    """Train `stage` ('pretrain' | 'finetune') as configured, resuming from the run's latest checkpoint
    (refused when training settings changed, unless `allow_config_change`; see `check_resume_config`).

    The config is checked first (before any tokenizer, dataset or directory work) and the workdir is
    locked for the whole stage. SIGINT / SIGTERM stop the loop at a step boundary, save a checkpoint of
    that step and raise `Interrupted`.
    """
    check_run_config(cfg, (stage,))
    initialize_distributed(cfg)
    run_dir = os.path.abspath(cfg.run_dir(stage))
    init_from = cfg.stage(stage).init_from
    if init_from and not ckpt_lib.is_training_checkpoint(os.path.join(run_dir, "checkpoints")):
        path = resolve_init_from(cfg, init_from)
        if not os.path.exists(path):
            hint = (f"run `bart-jax {init_from[4:]}` with this workdir first, or " if init_from.startswith("run:")
                    else "")
            raise UserError(f"{stage}.init_from={init_from!r}: {path} does not exist; {hint}set "
                            f"{stage}.init_from to a checkpoint (or null for random initialisation)")
    from bart_jax.runlock import run_directory_lock

    # One process per run directory (on a multi-host run, process 0 holds it for all of them).
    lock = run_directory_lock(cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        try:
            return _run_stage(cfg, stage, stop_at_step=stop_at_step, allow_config_change=allow_config_change)
        except BaseException:
            ckpt_lib.close_all()  # no orbax thread may outlive a failed stage (it would print after the error)
            raise


def _run_stage(cfg: RunConfig, stage: str, *, stop_at_step: int | None = None,
               allow_config_change: bool = False) -> TrainResult:
    sc = cfg.stage(stage)
    t = sc.train
    run_dir = os.path.abspath(cfg.run_dir(stage))
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    main_process = jax.process_index() == 0

    tok, tokenizer_dir = load_or_train_tokenizer(cfg)
    mesh = partitioning.make_mesh(cfg.mesh)
    partitioning.check_batch_divisible(t.batch_size, t.micro_batches, mesh, f"{stage}.train.batch_size")
    if t.batch_size % jax.process_count():
        raise ValueError(f"{stage}.train.batch_size={t.batch_size} must divide evenly over "
                         f"{jax.process_count()} processes")
    local_batch = t.batch_size // jax.process_count()

    ckpt = ckpt_lib.Checkpointer(checkpoint_dir, cfg.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:  # resuming: the architecture is the one this run started with
        where = os.path.join(checkpoint_dir, str(latest))
        stored_dict = ckpt_lib.read_checkpoint_config(where)
        stored = _stored_model_config(stored_dict, where)
        check_resume_config(stored_dict.get("run"), cfg, stage, where, allow_config_change)
        model_config = _merge_model_config(stored, cfg, where)
        init = None
    else:
        model_config, init = model_config_and_init(cfg, stage)
    _vocab_check(model_config, tok)
    for field in ("source_length", "target_length"):
        if getattr(t, field) > model_config.max_position_embeddings:
            raise ValueError(f"{stage}.train.{field}={getattr(t, field)} exceeds the model's "
                             f"max_position_embeddings={model_config.max_position_embeddings}")

    from bart_jax.model import param_logical_axes

    logical = param_logical_axes(model_config)
    params_shape = abstract_params(model_config)
    optimizer, schedule = optim.make_optimizer(sc.optimizer, sc.schedule, t.steps, params_shape, logical)
    shardings, abstract_state = state_shardings(model_config, optimizer, mesh)

    data_states = None
    if latest is not None:
        state, data_states, _ = ckpt.restore(latest, abstract_state, shardings)
        if main_process:
            print(f"{stage}: resumed from step {latest} ({checkpoint_dir})", flush=True)

    dataset = prepared_dataset(cfg, stage)
    if latest is None:
        params = init(params_shape, shardings.params)
        state, _ = create_train_state(model_config, optimizer, mesh, t.seed, params=params)
        if params is None and sc.logits_bias_init == "target_prior":
            batches = stage_batches(cfg, stage, tok, dataset, 64, cfg.data.train_split, shuffle=True,
                                    num_epochs=1, whole_split=True)
            log_prior = target_log_prior(batches, model_config.vocab_size, tok.pad_id, max_batches=32)
            state = with_logits_bias(state, log_prior, shardings.params["final_logits_bias"])
    splits = [cfg.data.train_split] + ([cfg.data.eval_split] if t.eval_every > 0 else [])
    missing = [s for s in splits if s not in dataset]
    if missing:
        raise UserError(f"the {stage} data {getattr(dataset, 'path', '')} has no split(s) {missing} (has "
                        f"{sorted(dataset)}); set data.train_split / data.eval_split, or eval_every=0")
    train_it = stage_batches(cfg, stage, tok, dataset, local_batch, cfg.data.train_split, shuffle=True,
                             decoder_start_id=model_config.decoder_start_token_id)
    if data_states:
        train_it.set_state(data_states[jax.process_index()])

    if stage == "pretrain":
        train_batch_fn, eval_batch_fn = noise_batch_fns(cfg, tok)
    else:
        train_batch_fn = eval_batch_fn = identity_batch
    train_step = compile_train_step(
        make_train_step(model_config, optimizer, schedule, micro_batches=t.micro_batches,
                        label_smoothing=t.label_smoothing, label_smoothing_form=t.label_smoothing_form,
                        batch_fn=train_batch_fn, grad_shardings=shardings.params),
        shardings, mesh)
    eval_step = compile_eval_step(
        make_eval_step(model_config, label_smoothing=t.label_smoothing, label_smoothing_form=t.label_smoothing_form,
                       batch_fn=eval_batch_fn),
        shardings.params, mesh)
    batch_sharding = partitioning.batch_sharding(mesh)

    def evaluate(params) -> dict[str, float]:
        from bart_jax.data import to_global_batch

        it = stage_batches(cfg, stage, tok, dataset, local_batch, cfg.data.eval_split, shuffle=False,
                            num_epochs=None if stage == "pretrain" else 1,
                            decoder_start_id=model_config.decoder_start_token_id)
        sums = None
        for i in range(t.eval_batches):
            try:
                local = next(it)
            except StopIteration:
                break
            local = {k: v for k, v in local.items() if k != "example_id"}
            out = eval_step(params, to_global_batch(local, batch_sharding), jnp.int32(i))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        metrics = summarize_eval(jax.device_get(sums)) if sums is not None else {}
        if stage == "finetune" and t.eval_rouge_examples > 0:
            metrics.update(validation_rouge(params))
        return metrics

    def validation_rouge(params) -> dict[str, float]:
        """Greedy summaries of the first `eval_rouge_examples` validation documents, scored with ROUGE."""
        if jax.process_count() > 1:
            return {}  # decoding here would need every process's params on one host
        from bart_jax.decode.generate import summarize
        from bart_jax.decode.rouge import rouge_scores

        source = dataset[cfg.data.eval_split]
        pairs = [source[i] for i in range(min(len(source), t.eval_rouge_examples))]
        if not pairs:
            return {}
        predictions = summarize([_text(p["document"]) for p in pairs], model_config, params, tok,
                                batch_size=min(len(pairs), 8), max_source_length=t.source_length,
                                num_beams=1, max_length=t.target_length)
        scores = rouge_scores(predictions, [_text(p["summary"]) for p in pairs])
        return {f"eval_{k}": v for k, v in scores.items()}

    config_dict = {"run": cfg.to_dict(), "stage": stage, "model_config": model_config.to_dict()}
    start = int(jax.device_get(state.step))
    resumed_from = latest
    meter = _Meter(model_config, _peak_flops(model_config, t))
    writer = _writer(run_dir)
    bar = None
    if main_process and t.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc=stage, dynamic_ncols=True)

    losses: list[float] = []
    eval_metrics: dict[str, float] = {}
    end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
    pending = None  # (step number, device metrics, shape): read one step late to keep dispatch async

    def settle(item):
        """Bring a finished step's metrics to the host: record, log, and stop on repeated NaN/inf."""
        step_no, metrics, shape = item
        m = _host_metrics(metrics)
        losses.append(m["loss"])
        meter.tick(*shape)
        if m["nonfinite_streak"] >= t.max_nonfinite:
            ckpt.wait()
            raise TrainingDiverged(
                f"{stage}: {int(m['nonfinite_streak'])} consecutive steps with a non-finite loss or gradient "
                f"(up to step {step_no}; {int(m['nonfinite_total'])} skipped in all). Stopped; the last good "
                f"checkpoint is step {ckpt.latest_step()} in {checkpoint_dir}.")
        if bar is not None:
            bar.update(1)
        if step_no % t.log_every == 0 or step_no == end:
            speed = meter.read()
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}",
                                tok_s=f"{speed['tokens_per_s']:.0f}", mfu=f"{100 * speed['mfu']:.1f}%")
            if writer is not None:
                for k in ("loss", "nll", "accuracy", "grad_norm", "learning_rate"):
                    writer.add_scalar(f"train/{k}", m[k], step_no)
                writer.add_scalar("train/tokens_per_s", speed["tokens_per_s"], step_no)
                writer.add_scalar("train/mfu", speed["mfu"], step_no)
                writer.add_scalar("train/skipped_total", m["nonfinite_total"], step_no)
            if bar is None and main_process:
                print(f"{stage} step {step_no}: loss {m['loss']:.4f} lr {m['learning_rate']:.3e} "
                      f"tok/s {speed['tokens_per_s']:.0f} mfu {100 * speed['mfu']:.1f}%", flush=True)
        return m

    completed = False
    stop = _StopRequest() if jax.process_count() == 1 else None
    data_state = train_it.get_state()
    interrupted = False
    try:
        from bart_jax.data import to_global_batch

        for step in range(start, end):
            if stop is not None and stop.signum is not None:
                interrupted = True
                break  # a step boundary: everything before this step is in `state`
            local = next(train_it)
            local = {k: v for k, v in local.items() if k != "example_id"}
            data_state = train_it.get_state()  # position after this batch: what a resume at step+1 needs
            state, metrics = train_step(state, to_global_batch(local, batch_sharding))
            if pending is not None:
                settle(pending)
            pending = (step + 1, metrics, _global_shape(local, stage))
            step_no = step + 1
            do_eval = t.eval_every > 0 and (step_no % t.eval_every == 0 or step_no == t.steps)
            do_save = step_no % t.checkpoint_every == 0 or step_no == t.steps
            if do_eval or do_save:
                m = settle(pending)
                pending = None
                if do_eval:
                    eval_metrics = evaluate(state.params)
                    if writer is not None:
                        for k, v in eval_metrics.items():
                            writer.add_scalar(f"eval/{k.removeprefix('eval_')}", v, step_no)
                    if bar is not None:
                        bar.write(f"{stage} step {step_no}: " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if do_save and m["nonfinite_streak"] == 0:  # never checkpoint in the middle of a NaN streak
                    # Only steps validated on the ranking metric compete for "best".
                    ranked = do_eval and cfg.checkpoint.best_metric in eval_metrics
                    ckpt.save(state, config=config_dict, data_states=ckpt_lib.gather_process_states(data_state),
                              metrics=eval_metrics if ranked else None)
        if pending is not None:
            settle(pending)
        if interrupted:
            raise _save_on_interrupt(stop.signum, stage, state, ckpt, config_dict, data_state, checkpoint_dir)
        completed = True
    finally:
        if stop is not None:
            stop.restore()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.wait()
        if not completed:
            ckpt.close()

    final_step = int(jax.device_get(state.step))
    model_dir = None
    if final_step >= t.steps:
        model_dir = os.path.join(run_dir, "model")
        params_host = _gather_params(state.params)
        if main_process:
            from bart_jax.convert import save_model

            save_model(model_dir, model_config, params_host, extra=tok.save)
    best = ckpt.best_step()
    ckpt.close()
    return TrainResult(stage=stage, final_step=final_step, losses=losses, eval_metrics=eval_metrics,
                       run_dir=run_dir, checkpoint_dir=checkpoint_dir, model_dir=model_dir,
                       tokenizer_dir=tokenizer_dir, best_step=best, resumed_from=resumed_from,
                       nonfinite_total=int(jax.device_get(state.nonfinite_total)), model_config=model_config)


class _StopRequest:
    """SIGINT / SIGTERM handlers that only record the signal, so the loop stops at a step boundary; a
    second signal interrupts at once. Handlers are installed only from the main thread."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
        self.signum = signum

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _save_on_interrupt(signum, stage, state, ckpt, config_dict, data_state, checkpoint_dir) -> Interrupted:
    """Checkpoint the step the loop stopped at (unless it is saved already or mid NaN streak)."""
    ckpt.wait()
    step = int(jax.device_get(state.step))
    if ckpt.latest_step() != step and int(jax.device_get(state.nonfinite_streak)) == 0:
        ckpt.save(state, config=config_dict, data_states=ckpt_lib.gather_process_states(data_state))
        ckpt.wait()
    saved = ckpt.latest_step()
    if saved == step:
        where = f"checkpoint saved in {os.path.join(checkpoint_dir, str(step))}"
    elif saved is not None:
        where = f"the last checkpoint is step {saved} in {checkpoint_dir}"
    else:
        where = "no checkpoint could be saved"
    return Interrupted(f"interrupted at step {step} ({stage}); {where}; run the same command to resume", signum)


# Settings that define the training trajectory a checkpoint is part of: the learning-rate schedule is built
# from them, the optimizer state and data-iterator position only mean something under them. Everything
# else (logging, evaluation and checkpoint cadence, mesh, dtype, remat...) may change on resume.
RESUME_CHECKED_KEYS = (
    "{stage}.optimizer", "{stage}.schedule", "{stage}.train.steps", "{stage}.train.batch_size",
    "{stage}.train.micro_batches", "{stage}.train.source_length", "{stage}.train.target_length",
    "{stage}.train.seed", "{stage}.train.label_smoothing", "data.{stage}_source", "data.train_split",
    "data.shuffle_seed", "noise")
ALLOW_CONFIG_CHANGE_HELP = ("resume even if training settings (steps, optimizer, schedule, batch size, lengths, "
                            "data, noise) differ from the checkpoint's; what changed is logged")


_MISSING = object()


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def resume_config_changes(stored_run: dict, cfg: RunConfig, stage: str) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every `RESUME_CHECKED_KEYS` setting that differs.
    Keys the stored config lacks (written by an older version) are not compared."""
    # Through JSON, as the checkpoint stored it, so tuples and lists compare equal.
    current = json.loads(json.dumps(cfg.to_dict()))
    changes = []
    for pattern in RESUME_CHECKED_KEYS:
        if pattern == "noise" and stage != "pretrain":
            continue  # only pretraining noises its batches
        path = pattern.format(stage=stage).split(".")
        old, new = stored_run, current
        for part in path:
            old = old.get(part, _MISSING) if isinstance(old, dict) else _MISSING
            new = new.get(part, _MISSING) if isinstance(new, dict) else _MISSING
        if old is _MISSING:
            continue
        flat_old, flat_new = _flatten(old, ".".join(path)), _flatten(new, ".".join(path))
        for key in sorted(set(flat_old) | set(flat_new)):
            a, b = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
            if a != b:
                changes.append((key, None if a is _MISSING else a, None if b is _MISSING else b))
    return changes


def check_resume_config(stored_run: dict | None, cfg: RunConfig, stage: str, where: str,
                        allow_config_change: bool) -> None:
    """Refuse (ValueError) to resume from the checkpoint at `where` when this run's training settings differ
    from the ones it was trained with; with `allow_config_change`, log the changes and go on."""
    if not isinstance(stored_run, dict):
        return  # nothing stored to compare with
    changes = resume_config_changes(stored_run, cfg, stage)
    if not changes:
        return
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if allow_config_change:
        logger.warning("resuming from %s with changed training settings (allowed): %s", where, listed)
        return
    raise ValueError(f"resuming from {where}: this run's training settings differ from the checkpoint's "
                     f"(checkpoint -> now) {listed}; pass --allow-config-change (allow_config_change=True) to "
                     "resume with the new settings, or train into another workdir / run_name")


def _stored_model_config(stored: dict, where: str) -> BartConfig:
    """The BartConfig a checkpoint was trained with (stored beside it by `run_stage`)."""
    if not isinstance(stored, dict) or "model_config" not in stored:
        raise ValueError(f"{where}: the checkpoint's stored config has no model_config; not a bart_jax "
                         "training checkpoint")
    return BartConfig.from_dict(stored["model_config"])
