"""The training stages: `pretrain(cfg)` (denoising) and `finetune(cfg)` (document -> summary). Each is
`run_stage`: check the config, lock the workdir, `setup_stage` (bart_jax.train.setup), `train_loop`,
`finalise`.

A run lives in `<workdir>/<run_name>/`: `checkpoints/` (orbax, see bart_jax.train.checkpoint), `tb/`
(TensorBoard events) and, when training completes, `model/` (final parameters as a bart_jax model
directory, `bart_jax.from_pretrained`-loadable, plus the tokenizer). Re-running the same command resumes
from the latest checkpoint: parameters, optimizer, step, PRNG and data-iterator position, so the losses
continue exactly as if the run had not stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.config import BartConfig
from bart_jax.errors import Interrupted
from bart_jax.train import checkpoint as ckpt_lib
from bart_jax.train import flops as flops_lib
from bart_jax.train import partitioning, resume
from bart_jax.train.config import RunConfig
from bart_jax.train.distributed import StopRequest, StopVote, initialize_distributed, signum_of
from bart_jax.train.preflight import check_run_config
from bart_jax.train.inputs import as_text, stage_batches
from bart_jax.train.progress import Progress, StageReporter, global_shape
from bart_jax.train.setup import StageSetup, setup_stage
from bart_jax.train.step import summarize_eval

__all__ = ["TrainResult", "Interrupted", "StageReporter", "pretrain", "finetune", "run_stage", "train_loop", "finalise"]

logger = logging.getLogger(__name__)


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
def pretrain(cfg: RunConfig, *, stop_at_step: int | None = None, allow_config_change: bool = False,
             reporter: StageReporter | None = None) -> TrainResult:
    """Denoising pretraining: clean {'tokens'} batches are noised on device inside the train step.

    stop_at_step: return once the global step reaches this value without writing a final checkpoint
    (what a preempted job leaves behind); rerunning resumes from the last checkpoint.
    allow_config_change: resume even when training settings (`RESUME_CHECKED_KEYS`) differ from the
    checkpoint's, logging what changed; otherwise that is a ValueError.
    reporter: told about the resume and the settled steps (default: `StageReporter`, which logs).
    """
    return run_stage(cfg, "pretrain", stop_at_step=stop_at_step, allow_config_change=allow_config_change,
                     reporter=reporter)


def finetune(cfg: RunConfig, *, stop_at_step: int | None = None, allow_config_change: bool = False,
             reporter: StageReporter | None = None) -> TrainResult:
    """Fine-tuning on document -> summary pairs, initialised from `cfg.finetune.init_from` (arguments as
    for `pretrain`)."""
    return run_stage(cfg, "finetune", stop_at_step=stop_at_step, allow_config_change=allow_config_change,
                     reporter=reporter)


def run_stage(cfg: RunConfig, stage: str, *, stop_at_step: int | None = None,
              allow_config_change: bool = False, reporter: StageReporter | None = None,
              checked: bool = False) -> TrainResult:
    """Train `stage` ('pretrain' | 'finetune') as configured, resuming from the run's latest checkpoint
    (refused when training settings changed, unless `allow_config_change`; see `check_resume_config`).
    `reporter` is told about the resume and the settled steps (default: `StageReporter`, which logs).

    The config is checked first (before any tokenizer, dataset or directory work; `checked`: the caller
    already ran `check_run_config` for this stage, as the main job does for all its stages) and the workdir is
    locked for the whole stage. SIGINT / SIGTERM (to any process of a multi-process job) end the stage with
    `Interrupted` after saving what it has: a checkpoint of the step reached (see `train_loop`), or, during
    the export, the finished model; while the stage prepares, one process stops at once.
    """
    if not checked:
        check_run_config(cfg, (stage,))
    initialize_distributed(cfg)
    resume.check_init_from_exists(cfg, stage)
    from bart_jax.runlock import run_directory_lock

    # One process per run directory (on a multi-host run, process 0 holds it for all of them).
    lock = run_directory_lock(cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    reporter = reporter or StageReporter()
    # From the first step to the exported model a signal is only recorded, and acted on where the stage can
    # save: the next step boundary, or the end of the stage. Several processes must stop together, so there
    # that holds from the start (a signal while preparing stops all at the first step); one process stops
    # at once while it prepares.
    early = None
    with lock:
        try:
            early = StopRequest() if jax.process_count() > 1 else None
            setup = setup_stage(cfg, stage, allow_config_change=allow_config_change, reporter=reporter)
            with early or StopRequest() as stop:
                state, losses, eval_metrics = train_loop(setup, stop_at_step=stop_at_step, reporter=reporter,
                                                         stop=stop)
                result = finalise(setup, state, losses, eval_metrics)
                signum = StopVote(stop).now()
            if signum:
                saved = f"its model is in {result.model_dir}" if result.model_dir else "its checkpoints are saved"
                raise Interrupted(f"interrupted at the end of {stage} (step {result.final_step}; {saved}); run "
                                  "the same command to resume", signum)
            return result
        except BaseException as e:
            ckpt_lib.close_all()  # no orbax thread may outlive a failed stage (it would print after the error)
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
                # Before the first step (tokenizer, data, compilation): nothing of this stage to save yet.
                raise Interrupted(f"interrupted while preparing {stage}, before its first step; run the same "
                                  "command to resume", signum_of(e)) from None
            raise
        finally:
            if early is not None:
                early.restore()


# ------------------------------------------------------------------------------------------ the loop
def train_loop(s: StageSetup, *, stop_at_step: int | None = None, reporter: StageReporter | None = None,
               stop: StopRequest | None = None):
    """Steps from `s.state` to the last step (or `stop_at_step`): validation every `eval_every` steps and
    at the end, checkpoints every `checkpoint_every` steps and at the end. Returns (state, losses of the
    steps run, last validation metrics). `reporter` (default: `StageReporter`, which logs) is told about
    settled steps when the bar is off.

    SIGINT / SIGTERM (recorded by `stop`, default: handlers installed for the loop) stop the loop at a step
    boundary that every process agrees on (`StopVote`); a signal during the last step or the final
    evaluation is honoured after them. Either way the step reached is checkpointed and Interrupted raised."""
    from bart_jax.data import to_global_batch

    t = s.train
    start = int(jax.device_get(s.state.step))
    end = t.steps if stop_at_step is None else min(t.steps, stop_at_step)
    progress = Progress(s.stage, t, s.model_config, _peak_flops(s.model_config, t), s.run_dir, start, end,
                        reporter or StageReporter())
    batch_sharding = partitioning.batch_sharding(s.mesh)
    state, eval_metrics = s.state, {}
    pending = None  # (step number, device metrics, shape): read one step late to keep dispatch async
    own_stop = stop is None
    stop = StopRequest() if own_stop else stop
    vote = StopVote(stop)
    signum, completed = None, False
    try:
        for step in range(start, end):
            signum = vote.at_boundary()
            if signum:
                break  # a step boundary: everything before this step is in `state`
            local = same_shape_everywhere(next(s.train_batches), s.tokenizer.pad_id)
            state, metrics = s.train_step(state, to_global_batch(local, batch_sharding))
            if pending is not None:
                progress.settle(*pending, s.last_checkpoint)
            step_no = step + 1
            pending = (step_no, metrics, global_shape(local, s.stage))
            do_eval = t.eval_every > 0 and (step_no % t.eval_every == 0 or step_no == t.steps)
            do_save = step_no % t.checkpoint_every == 0 or step_no == t.steps
            if do_eval or do_save:
                m = progress.settle(*pending, s.last_checkpoint)
                pending = None
                if do_eval:
                    eval_metrics = evaluate(s, state.params)
                    progress.show_eval(step_no, eval_metrics)
                if do_save and m["nonfinite_streak"] == 0:  # never checkpoint in the middle of a NaN streak
                    # Only steps validated on the ranking metric compete for "best".
                    ranked = do_eval and s.cfg.checkpoint.best_metric in eval_metrics
                    s.ckpt.save(state, config=s.checkpoint_config(), data_iterator=s.train_batches,
                                metrics=eval_metrics if ranked else None)
        if pending is not None:
            progress.settle(*pending, s.last_checkpoint)
        signum = signum or vote.now()  # a signal during the last step or the final evaluation
        if signum:
            raise _save_on_interrupt(s, state, signum)
        completed = True
    finally:
        if own_stop:
            stop.restore()
        progress.close()
        s.ckpt.wait()
        if not completed:
            s.ckpt.close()
    return state, progress.losses, eval_metrics


def evaluate(s: StageSetup, params) -> dict[str, float]:
    """Validation loss/accuracy over `eval_batches` batches of the eval split (noised by a fixed stream
    when pretraining), plus ROUGE of greedy summaries when fine-tuning with `eval_rouge_examples`."""
    from bart_jax.data import to_global_batch

    t = s.train
    batches = stage_batches(s.cfg, s.stage, s.tokenizer, s.dataset, s.local_batch, s.cfg.data.eval_split,
                            shuffle=False, num_epochs=None if s.stage == "pretrain" else 1)
    batch_sharding = partitioning.batch_sharding(s.mesh)
    sums = None
    for i, local in zip(range(t.eval_batches), batches):
        local = same_shape_everywhere(local, s.tokenizer.pad_id)
        out = s.eval_step(params, to_global_batch(local, batch_sharding), jnp.int32(i))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    metrics = summarize_eval(jax.device_get(sums)) if sums is not None else {}
    if s.stage == "finetune" and t.eval_rouge_examples > 0:
        metrics.update(_validation_rouge(s, params))
    return metrics


def same_shape_everywhere(local: dict, pad_id: int) -> dict:
    """This process's batch (without 'example_id'), fine-tuning batches padded to the longest source and
    target of every process's batch: each shard buckets its own lengths, and a global batch needs one shape.
    The padding is masked, so the loss is unchanged. With several processes this waits for all of them."""
    from bart_jax.data.multihost import pad_batch

    local = {k: v for k, v in local.items() if k != "example_id"}
    if "input_ids" not in local or jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    lengths = np.asarray([local["input_ids"].shape[1], local["labels"].shape[1]], np.int32)
    source, target = np.asarray(multihost_utils.process_allgather(lengths)).max(axis=0)
    return pad_batch(local, int(source), int(target), pad_id)


def _validation_rouge(s: StageSetup, params) -> dict[str, float]:
    """Greedy summaries of the first `eval_rouge_examples` validation documents, scored with ROUGE. With
    several processes every one gathers the parameters and decodes the same documents on its own devices,
    so all report the same scores."""
    from bart_jax.decode.generate import summarize
    from bart_jax.decode.rouge import rouge_scores

    t = s.train
    source = s.dataset[s.cfg.data.eval_split]
    pairs = [source[i] for i in range(min(len(source), t.eval_rouge_examples))]
    if not pairs:
        return {}
    if jax.process_count() > 1:
        params = _gather_params(params)
    predictions = summarize([as_text(p["document"]) for p in pairs], s.model_config, params, s.tokenizer,
                            batch_size=min(len(pairs), 8), max_source_length=t.source_length,
                            num_beams=1, max_length=t.target_length)
    scores = rouge_scores(predictions, [as_text(p["summary"]) for p in pairs])
    return {f"eval_{k}": v for k, v in scores.items()}


def finalise(s: StageSetup, state, losses: list[float], eval_metrics: dict[str, float]) -> TrainResult:
    """Export the final parameters (with the tokenizer) to `<run_dir>/model` when the last step is done,
    close the checkpoints and describe the run."""
    final_step = int(jax.device_get(state.step))
    model_dir = None
    if final_step >= s.train.steps:
        model_dir = os.path.join(s.run_dir, "model")
        params_host = _gather_params(state.params)
        if jax.process_index() == 0:
            from bart_jax.convert import save_model

            save_model(model_dir, s.model_config, params_host, extra=s.tokenizer.save)
    best = s.ckpt.best_step()
    s.ckpt.close()
    return TrainResult(stage=s.stage, final_step=final_step, losses=losses, eval_metrics=eval_metrics,
                       run_dir=s.run_dir, checkpoint_dir=s.checkpoint_dir, model_dir=model_dir,
                       tokenizer_dir=s.tokenizer_dir, best_step=best, resumed_from=s.resumed_from,
                       nonfinite_total=int(jax.device_get(state.nonfinite_total)), model_config=s.model_config)


def _peak_flops(model_config: BartConfig, t) -> float | None:
    if t.peak_flops_per_device is not None:
        peak = flops_lib.Peak(t.peak_flops_per_device, "train.peak_flops_per_device")
    else:
        peak = flops_lib.datasheet_peak(model_config.compute_dtype)
    if peak is None:
        logger.info("no datasheet peak for %s: progress shows tokens/s, not MFU", jax.devices()[0].device_kind)
        return None
    logger.info("MFU is against %.4g FLOP/s per device (%s) x %d devices", peak.flops_per_s, peak.source,
                jax.device_count())
    return peak.flops_per_s * jax.device_count()


def _gather_params(params):
    """Parameters as host numpy arrays on every process (for exporting the model)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(params))
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def _save_on_interrupt(s: StageSetup, state, signum) -> Interrupted:
    """Checkpoint the step the loop stopped at (unless it is saved already or mid NaN streak)."""
    s.ckpt.wait()
    step = int(jax.device_get(state.step))
    if s.ckpt.latest_step() != step and int(jax.device_get(state.nonfinite_streak)) == 0:
        s.ckpt.save(state, config=s.checkpoint_config(), data_iterator=s.train_batches)
        s.ckpt.wait()
    saved = s.ckpt.latest_step()
    if saved == step:
        where = f"checkpoint saved in {os.path.join(s.checkpoint_dir, str(step))}"
    elif saved is not None:
        where = f"the last checkpoint is step {saved} in {s.checkpoint_dir}"
    else:
        where = "no checkpoint could be saved"
    return Interrupted(f"interrupted at step {step} ({s.stage}); {where}; run the same command to resume", signum)
