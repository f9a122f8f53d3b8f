"""What a stage trains on, identified by content: its tokenizer and its dataset.

Each checkpoint records both (`inputs` in its stored config). A model and its tokenizer travel together: a
stage that starts from a model (resuming its own checkpoint, or `init_from` another run's checkpoint or a model
directory that holds tokenizer files) trains with that model's tokenizer, and a `data.tokenizer` naming another
one is refused. A resume whose dataset was rebuilt from other inputs under the same path is refused too (like
any other change of training data, `--allow-config-change` lets it through with a warning).
"""

from __future__ import annotations

import logging
import os

from bart_jax.errors import UserError
from bart_jax.train import checkpoint as ckpt_lib
from bart_jax.train.config import RunConfig
from bart_jax.train.resume import ResumePoint, resolve_init_from

logger = logging.getLogger(__name__)


def stage_inputs(tok, dataset) -> dict:
    """The record a checkpoint stores: {'tokenizer': fingerprint, 'dataset': fingerprint or None}."""
    return {"tokenizer": tok.fingerprint, "dataset": getattr(dataset, "fingerprint", None)}


def _recorded(stored: dict) -> dict:
    inputs = stored.get("inputs") if isinstance(stored, dict) else None
    return inputs if isinstance(inputs, dict) else {}  # checkpoints written before the record: nothing to check


def _stored_tokenizer_path(stored: dict) -> str | None:
    """Where the run that wrote a checkpoint kept its tokenizer: `data.tokenizer`, else `<workdir>/tokenizer`."""
    run = stored.get("run") if isinstance(stored, dict) else None
    if not isinstance(run, dict):
        return None
    if (run.get("data") or {}).get("tokenizer"):
        return run["data"]["tokenizer"]
    return os.path.join(run["workdir"], "tokenizer") if run.get("workdir") else None


def _carried_tokenizer(cfg: RunConfig, stage: str, resumed: ResumePoint | None):
    """(what, fingerprint or None, path or None) of the tokenizer the stage's starting model carries, or None
    when it starts from random weights or a model without tokenizer files (a fairseq model.pt)."""
    from bart_jax.data import load_tokenizer

    if resumed is not None:
        where, stored = resumed.directory, resumed.stored
    elif cfg.stage(stage).init_from:
        path = resolve_init_from(cfg, cfg.stage(stage).init_from)
        if not ckpt_lib.is_training_checkpoint(path):
            try:
                return f"the model at {path}", load_tokenizer(path).fingerprint, path
            except (FileNotFoundError, NotADirectoryError):
                return None
        where, stored = path, ckpt_lib.read_checkpoint_config(path)
    else:
        return None
    return f"the checkpoint at {where}", _recorded(stored).get("tokenizer"), _stored_tokenizer_path(stored)


def stage_tokenizer(cfg: RunConfig, stage: str, resumed: ResumePoint | None = None):
    """(tokenizer, its directory) for `stage`: the starting model's own (see the module docstring), else
    `data.tokenizer` or the workdir's (`inputs.load_or_train_tokenizer`). `resumed`: the stage's own
    checkpoint when it resumes (`resume.resume_point`). UserError when `data.tokenizer` differs from the
    model's."""
    from bart_jax.data import load_tokenizer
    from bart_jax.train.inputs import load_or_train_tokenizer

    carried = _carried_tokenizer(cfg, stage, resumed)
    if carried is None:
        return load_or_train_tokenizer(cfg)
    what, fingerprint, path = carried
    if not cfg.data.tokenizer and path is not None and os.path.exists(path):
        tok, directory = load_tokenizer(path), path
    else:
        tok, directory = load_or_train_tokenizer(cfg)
    if fingerprint is not None and tok.fingerprint != fingerprint:
        kept = f" ({path})" if path else ""
        raise UserError(f"{what} was trained with tokenizer {fingerprint}{kept}, but this run's tokenizer "
                        f"{directory} is {tok.fingerprint}; a model and its tokenizer go together: leave "
                        "data.tokenizer unset to use the model's own, or set it to that tokenizer")
    return tok, directory


def check_dataset_unchanged(resumed: ResumePoint, dataset, stage: str, allow_config_change: bool) -> None:
    """Refuse (UserError) to resume on a dataset whose contents differ from the one the checkpoint `resumed`
    was trained on (the same path, rebuilt from other inputs); with `allow_config_change`, warn."""
    recorded = _recorded(resumed.stored).get("dataset")
    current = getattr(dataset, "fingerprint", None)
    if recorded is None or current is None or recorded == current:
        return
    message = (f"the {stage} data {getattr(dataset, 'path', '')} was rebuilt from other inputs since the "
               f"checkpoint at {resumed.directory} was written (fingerprint {recorded} -> {current})")
    if allow_config_change:
        logger.warning("resuming with changed training data (allowed): %s", message)
        return
    raise UserError(f"{message}; pass --allow-config-change to resume on the new data, or train into "
                    "another workdir / run_name")
