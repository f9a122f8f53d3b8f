"""Where a stage's model starts: its own latest checkpoint (resume, refused when the training settings
changed), `init_from` (another run's checkpoint or a Hugging Face / fairseq / bart_jax model directory) or
a random initialisation; and the architecture that goes with it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from flax import traverse_util

from bart_jax.config import BartConfig
from bart_jax.errors import UserError
from bart_jax.train import checkpoint as ckpt_lib
from bart_jax.train.config import RunConfig

# BartConfig fields that do not change parameter shapes: a run may set them freely when it starts from a
# checkpoint whose architecture it inherits.
ARCH_NEUTRAL_FIELDS = frozenset({
    "dropout", "attention_dropout", "activation_dropout", "dtype", "param_dtype", "remat_policy", "scan_layers",
    "attention_implementation", "forced_bos_token_id", "forced_eos_token_id", "decode_layout"})


# Settings that define the training trajectory a checkpoint is part of: the learning-rate schedule is built
# from them, the optimizer state and data-iterator position only mean something under them. Everything
# else (logging, evaluation and checkpoint cadence, mesh, dtype, remat...) may change on resume.
RESUME_CHECKED_KEYS = (
    "{stage}.optimizer", "{stage}.schedule", "{stage}.train.steps", "{stage}.train.batch_size",
    "{stage}.train.micro_batches", "{stage}.train.source_length", "{stage}.train.target_length",
    "{stage}.train.seed", "{stage}.train.label_smoothing", "data.{stage}_source", "data.train_split",
    "data.shuffle_seed", "data.shards", "noise")
ALLOW_CONFIG_CHANGE_HELP = ("resume even if training settings (steps, optimizer, schedule, batch size, lengths, "
                            "data, noise) differ from the checkpoint's; what changed is logged")

logger = logging.getLogger(__name__)


def check_init_from_exists(cfg: RunConfig, stage: str) -> None:
    """A stage that is not resuming and starts from `init_from` needs that to exist (UserError)."""
    init_from = cfg.stage(stage).init_from
    if not init_from or ckpt_lib.is_training_checkpoint(cfg.checkpoint_dir(stage)):
        return
    path = resolve_init_from(cfg, init_from)
    if not os.path.exists(path):
        hint = f"run `bart-jax {init_from[4:]}` with this workdir first, or " if init_from.startswith("run:") else ""
        raise UserError(f"{stage}.init_from={init_from!r}: {path} does not exist; {hint}set "
                        f"{stage}.init_from to a checkpoint (or null for random initialisation)")


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The stage's own latest checkpoint, which it resumes from: its `step`, that step's `directory` and the
    config `stored` beside it (`read_checkpoint_config`), read once for every check of the resume."""

    step: int
    directory: str
    stored: dict


def resume_point(ckpt: ckpt_lib.Checkpointer) -> ResumePoint | None:
    """Where the stage resumes (its latest checkpoint in `ckpt`), or None when it has none and starts afresh."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    where = os.path.join(ckpt.directory, str(latest))
    return ResumePoint(latest, where, ckpt_lib.read_checkpoint_config(where))


def starting_point(cfg: RunConfig, stage: str, resumed: ResumePoint | None, allow_config_change: bool):
    """(BartConfig, init) of the stage. Resuming (`resumed`, from `resume_point`): the architecture it started
    with, after `check_resume_config`, and init None (the caller restores the checkpoint). Otherwise
    `model_config_and_init`."""
    if resumed is None:
        return model_config_and_init(cfg, stage)
    stored, where = resumed.stored, resumed.directory
    check_resume_config(stored.get("run"), cfg, stage, where, allow_config_change)
    return merge_model_config(stored_model_config(stored, where), cfg, where), None


def merge_model_config(base: BartConfig, cfg: RunConfig, where: str) -> BartConfig:
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
        stored = stored_model_config(ckpt_lib.read_checkpoint_config(path), path)
        model_config = merge_model_config(stored, cfg, f"the checkpoint at {path}")
        return model_config, lambda abstract, shardings: ckpt_lib.restore_params(path, abstract, shardings)
    if not os.path.exists(path):
        raise ValueError(f"{stage}.init_from={init_from!r}: {path} does not exist")
    from bart_jax.convert import from_pretrained

    base, _ = _load_pretrained_config(path)
    model_config = merge_model_config(base, cfg, f"the pretrained model at {path}")

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


def resume_config_changes(stored_run: dict, cfg: RunConfig, stage: str) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every `RESUME_CHECKED_KEYS` setting that differs
    (None for a side that lacks the key). Settings the stored config lacks entirely (written by an older
    version) are not compared."""
    # Through JSON, as the checkpoint stored it, so tuples and lists compare equal.
    current = traverse_util.flatten_dict(json.loads(json.dumps(cfg.to_dict())), sep=".")
    stored = traverse_util.flatten_dict(stored_run, sep=".")
    changes = []
    for pattern in RESUME_CHECKED_KEYS:
        if pattern == "noise" and stage != "pretrain":
            continue  # only pretraining noises its batches
        prefix = pattern.format(stage=stage)
        keys = sorted({k for k in (*stored, *current) if k == prefix or k.startswith(prefix + ".")})
        if not any(k in stored for k in keys):
            continue
        changes += [(k, stored.get(k), current.get(k)) for k in keys
                    if k not in stored or k not in current or stored[k] != current[k]]
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
                     f"(checkpoint -> now) {listed}; pass --allow-config-change to "
                     "resume with the new settings, or train into another workdir / run_name")


def stored_model_config(stored: dict, where: str) -> BartConfig:
    """The BartConfig a checkpoint was trained with (stored beside it by `run_stage`)."""
    if not isinstance(stored, dict) or "model_config" not in stored:
        raise ValueError(f"{where}: the checkpoint's stored config has no model_config; not a bart_jax "
                         "training checkpoint")
    return BartConfig.from_dict(stored["model_config"])
