"""Everything a training stage holds before its first step, built top to bottom by `setup_stage`:
tokenizer, mesh, the model's starting point, optimizer, abstract state and shardings, the state itself
(restored or initialised on its shardings), the data iterator and the compiled steps."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from bart_jax.config import BartConfig
from bart_jax.train import checkpoint as ckpt_lib
from bart_jax.train import optim, partitioning, provenance, resume
from bart_jax.train.config import RunConfig, TrainConfig
from bart_jax.train.inputs import (check_splits, data_shard_count, data_shards, noise_batch_fns,
                                   prepared_dataset, stage_batches)
from bart_jax.train.preflight import check_lengths_fit
from bart_jax.train.prior import smoothed_log_prior, target_counts, with_logits_bias
from bart_jax.train.progress import StageReporter
from bart_jax.train.state import TrainState, boxed_abstract_params, init_train_state, state_shardings
from bart_jax.train.step import (compile_eval_step, compile_train_step, identity_batch, make_eval_step,
                                 make_train_step)

logger = logging.getLogger(__name__)

# The target prior of a random init reads this many batches of this many rows (over all data shards).
PRIOR_BATCHES, PRIOR_ROWS = 32, 64


@dataclasses.dataclass
class StageSetup:
    """One stage, ready to train. `state` is the state to start from (restored when `resumed_from` is a
    step); `train_batches` is this process's grain iterator, already at the resumed position;
    `local_batch` its rows per step; `train_step(state, batch)` / `eval_step(params, batch, index)` are
    compiled for `mesh`; `ckpt` manages `<run_dir>/checkpoints`."""

    cfg: RunConfig
    stage: str
    run_dir: str
    tokenizer: Any
    tokenizer_dir: str
    mesh: Mesh
    model_config: BartConfig
    shardings: TrainState
    state: TrainState
    resumed_from: int | None
    ckpt: ckpt_lib.Checkpointer
    dataset: Any
    train_batches: Any
    local_batch: int
    train_step: Callable
    eval_step: Callable

    @property
    def train(self) -> TrainConfig:
        return self.cfg.stage(self.stage).train

    @property
    def checkpoint_dir(self) -> str:
        return self.ckpt.directory

    def checkpoint_config(self) -> dict:
        """What each checkpoint stores beside the state (read back by `resume` and `init_from`)."""
        return {"run": self.cfg.to_dict(), "stage": self.stage, "model_config": self.model_config.to_dict(),
                "inputs": provenance.stage_inputs(self.tokenizer, self.dataset)}

    def last_checkpoint(self) -> str:
        """'step N in DIR' of the newest finished checkpoint (after pending saves)."""
        self.ckpt.wait()
        return f"step {self.ckpt.latest_step()} in {self.checkpoint_dir}"


def setup_stage(cfg: RunConfig, stage: str, *, allow_config_change: bool = False,
                reporter: StageReporter | None = None) -> StageSetup:
    """Build `stage` of `cfg` (see StageSetup). Resumes from the run's latest checkpoint (and tells
    `reporter`, default: a log line); a resume whose training settings changed is refused unless
    `allow_config_change` (`resume.check_resume_config`)."""
    sc = cfg.stage(stage)
    t = sc.train
    run_dir = os.path.abspath(cfg.run_dir(stage))
    ckpt = ckpt_lib.Checkpointer(cfg.checkpoint_dir(stage), cfg.checkpoint)
    resuming = resume.resume_point(ckpt)
    resumed_from = None if resuming is None else resuming.step
    tok, tokenizer_dir = provenance.stage_tokenizer(cfg, stage, resuming)
    mesh = partitioning.make_mesh(cfg.mesh)
    local_batch = _local_batch(stage, t, mesh)

    model_config, init = resume.starting_point(cfg, stage, resuming, allow_config_change)
    _check_model_fits(stage, t, model_config, tok)

    boxed = boxed_abstract_params(model_config)
    optimizer, schedule = optim.make_optimizer(sc.optimizer, sc.schedule, t.steps, nn.meta.unbox(boxed),
                                               nn.get_partition_spec(boxed))
    shardings, abstract = state_shardings(model_config, optimizer, mesh, boxed_params=boxed)

    dataset = prepared_dataset(cfg, stage)
    check_splits(cfg, stage, dataset)
    if resuming is not None:
        provenance.check_dataset_unchanged(resuming, dataset, stage, allow_config_change)
    train_batches = stage_batches(cfg, stage, tok, dataset, local_batch, cfg.data.train_split, shuffle=True,
                                  decoder_start_id=model_config.decoder_start_token_id)
    if resumed_from is not None:
        state, _ = ckpt.restore(resumed_from, abstract, shardings, data_iterator=train_batches)
        if jax.process_index() == 0:
            (reporter or StageReporter()).resumed(stage, resumed_from, ckpt.directory)
    else:
        params = init(abstract.params, shardings.params)
        state = init_train_state(model_config, optimizer, mesh, t.seed, shardings, abstract, params=params)
        if params is None and sc.logits_bias_init == "target_prior":
            state = _with_target_prior(cfg, stage, tok, dataset, model_config, state, shardings)

    if stage == "pretrain":
        train_fn, eval_fn = noise_batch_fns(cfg, tok, model_config.decoder_start_token_id)
    else:
        train_fn, eval_fn = identity_batch, identity_batch
    train_step = compile_train_step(
        make_train_step(model_config, optimizer, schedule, micro_batches=t.micro_batches,
                        label_smoothing=t.label_smoothing, label_smoothing_form=t.label_smoothing_form,
                        batch_fn=train_fn, grad_shardings=shardings.params,
                        gradient_reduction=t.gradient_reduction),
        shardings, mesh)
    eval_step = compile_eval_step(
        make_eval_step(model_config, label_smoothing=t.label_smoothing, label_smoothing_form=t.label_smoothing_form,
                       batch_fn=eval_fn), shardings.params, mesh)
    return StageSetup(cfg=cfg, stage=stage, run_dir=run_dir, tokenizer=tok, tokenizer_dir=tokenizer_dir, mesh=mesh,
                      model_config=model_config, shardings=shardings, state=state, resumed_from=resumed_from,
                      ckpt=ckpt, dataset=dataset, train_batches=train_batches, local_batch=local_batch,
                      train_step=train_step, eval_step=eval_step)


def _with_target_prior(cfg: RunConfig, stage: str, tok, dataset, model_config: BartConfig, state: TrainState,
                       shardings: TrainState) -> TrainState:
    """A random init's state with `final_logits_bias` at the log prior of the stage's training targets (see
    bart_jax.train.prior): the first `PRIOR_BATCHES` batches of every data shard, `PRIOR_ROWS` rows each in
    all, each process counting its own shards and the counts summed over processes, so every process (and a
    run on any number of processes with the same `data.shards`) starts from the same bias."""
    shards = data_shards(cfg, jax.process_index(), jax.process_count())
    rows = max(1, PRIOR_ROWS // data_shard_count(cfg))
    batches = stage_batches(cfg, stage, tok, dataset, rows * len(shards), cfg.data.train_split, shuffle=True,
                            num_epochs=1, decoder_start_id=model_config.decoder_start_token_id)
    counts = target_counts(batches, model_config.vocab_size, tok.pad_id, max_batches=PRIOR_BATCHES)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts.astype(np.int32))).sum(axis=0)
    return with_logits_bias(state, smoothed_log_prior(counts), shardings.params["final_logits_bias"])


def _local_batch(stage: str, t: TrainConfig, mesh: Mesh) -> int:
    """This process's rows of each global batch (the batch must split over the mesh and the processes)."""
    partitioning.check_batch_divisible(t.batch_size, t.micro_batches, mesh, f"{stage}.train.batch_size")
    if t.batch_size % jax.process_count():
        raise ValueError(f"{stage}.train.batch_size={t.batch_size} must divide evenly over "
                         f"{jax.process_count()} processes")
    return t.batch_size // jax.process_count()


def _check_model_fits(stage: str, t: TrainConfig, model_config: BartConfig, tok) -> None:
    """The tokenizer's ids and the stage's lengths must fit the model (which may come from a checkpoint)."""
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                         f"{model_config.vocab_size}; set model.vocab_size={tok.vocab_size}")
    check_lengths_fit(stage, t, model_config)
