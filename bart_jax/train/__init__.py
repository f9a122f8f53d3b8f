"""Training: denoising pretraining and fine-tuning sharing one sharded train step.

    from bart_jax.train import load_config, pretrain, finetune
    cfg = load_config("tiny", ["pretrain.train.steps=100"])
    result = pretrain(cfg)          # TrainResult: final_step, losses, eval_metrics, checkpoint_dir, model_dir, ...
    result = finetune(cfg)          # starts from cfg.finetune.init_from (e.g. 'run:pretrain' or a HF dir)

Modules: config (run config on OmegaConf: YAML + overrides), optim (LAMB/AdamW, schedules, per-layer
trust ratio), partitioning (mesh, logical-axis rules, shardings), state (TrainState), step (loss, train/eval
steps), checkpoint (orbax), flops (MFU), inputs (tokenizer, datasets, batches, noise), resume (where a
stage's model starts), setup (everything before the first step), progress (metrics, logging), loop (the
stages: set up, train, finalise). The command lines are in bart_jax.cli.train. Names resolve lazily.
"""

from __future__ import annotations

from bart_jax.lazy import lazy_getattr

_LAZY = {
    "RunConfig": "bart_jax.train.config",
    "load_config": "bart_jax.train.config",
    "apply_overrides": "bart_jax.train.config",
    "pretrain": "bart_jax.train.loop",
    "finetune": "bart_jax.train.loop",
    "run_stage": "bart_jax.train.loop",
    "TrainResult": "bart_jax.train.loop",
    "TrainingDiverged": "bart_jax.train.progress",
    "StageReporter": "bart_jax.train.progress",
    "TrainState": "bart_jax.train.state",
    "Checkpointer": "bart_jax.train.checkpoint",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
