"""Training checkpoints on orbax-checkpoint: asynchronous, atomic, last-N + best-by-validation.

Layout of a run's checkpoint directory (one numbered directory per saved step)::

    <run_dir>/checkpoints/<step>/state/    TrainState as a dict: step, updates, params, opt_state, rng,
                                           nonfinite_streak, nonfinite_total (sharded arrays)
    <run_dir>/checkpoints/<step>/data/     grain's iterator checkpoint: process_<i>-of-<n>.json, one file
                                           per process, each written and read by its own process
    <run_dir>/checkpoints/<step>/config/   JSON: {"run": RunConfig.to_dict(), "stage": "pretrain"|"finetune",
                                           "model_config": BartConfig.to_dict()} (what the loop stores)
    <run_dir>/checkpoints/<step>/metrics/  JSON: validation metrics when the step had them (orbax's)

Atomicity is orbax's: a step is written under `<step>.orbax-checkpoint-tmp-*` and renamed when
complete, so a crash mid-save leaves only a temporary directory that `latest_step()` and restore ignore
(and that the next manager cleans up).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from bart_jax.train.config import CheckpointConfig
from bart_jax.train.state import TrainState

STATE, DATA, CONFIG = "state", "data", "config"
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()  # managers not closed yet (see close_all)


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "updates": state.updates, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng, "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, so orbax restores straight onto the (new) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """An orbax CheckpointManager for one run: keeps the last `keep` steps plus the best `keep_best` by
    `best_metric`; saves asynchronously (call `wait()` before reading what was saved, and `close()`)."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.cfg = cfg
        metric, sign = cfg.best_metric, (1.0 if cfg.best_mode == "max" else -1.0)
        policies = [ocm.LatestN(n=cfg.keep)]
        if cfg.keep_best > 0:
            policies.append(ocm.BestN(get_metric_fn=lambda m: sign * float(m[metric]), n=cfg.keep_best,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=lambda m: float(m[metric]), best_mode=cfg.best_mode,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, CONFIG))
        self._closed = False
        _OPEN.add(self)

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """Best step by the validation metric among kept steps with metrics; else the latest step."""
        with_metrics = [s for s in self.manager.all_steps() if self.manager.metadata(s).metrics]
        return self.manager.best_step() if with_metrics else self.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # ------------------------------------------------------------------ save / restore
    def save(self, state: TrainState, *, config: dict, data_iterator=None, metrics: dict | None = None) -> bool:
        """Start saving `state` at its step (asynchronously), with the position of this process's grain
        `data_iterator` (the batch the next step reads). Device arrays and the iterator position are
        copied before this returns, so the caller may donate `state` and advance the iterator at once."""
        step = int(jax.device_get(state.step))
        jax.block_until_ready(state)
        items = {STATE: ocp.args.StandardSave(_state_dict(state)), CONFIG: ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        args = ocp.args.Composite(**items)
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState, data_iterator=None):
        """(TrainState on `shardings`' mesh, config dict) of `step`; `data_iterator` (a grain iterator
        like the one saved) is moved to the saved position of this process.

        abstract_state: ShapeDtypeStruct TrainState of the *current* model/optimizer (the mesh may differ
        from the one that saved it)."""
        target = _abstract(_state_dict(abstract_state), _state_dict(shardings))
        items = {STATE: ocp.args.StandardRestore(target), CONFIG: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if data_iterator is None or "process_" not in str(e):
                raise
            raise ValueError(f"{self.directory}/{step}: no data-iterator position for process "
                             f"{jax.process_index()} of {jax.process_count()} (saved by another number of "
                             "processes or an older bart_jax); resume with the number of processes that "
                             "saved it") from None
        return TrainState(**out[STATE]), out[CONFIG]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        # The manager cleans old temporary directories in a thread started at construction, which
        # close() does not join; left running at interpreter exit it fails loudly.
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.manager.wait_until_finished()
        self.manager.close()


def close_all() -> None:
    """Finish pending saves and close every open Checkpointer (on an error path: orbax's background
    threads must not outlive the run, or they print after the error message)."""
    for c in list(_OPEN):
        try:
            c.close()
        except Exception:  # already failing; the original error is the one to report
            pass


# ---------------------------------------------------------------------- reading other runs' checkpoints
def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """True for a Checkpointer directory (holding numbered steps) or one step directory inside it."""
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, STATE)) or bool(saved_steps(path))


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps of a Checkpointer directory (numbered directories holding a state), ascending;
    [] when there are none or no such directory. Reads the file system only (no orbax manager)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n, STATE)))


def _resolve_step_dir(path: str) -> str:
    """A step directory: `path` itself, or the best (else latest) step of a checkpoint directory."""
    if os.path.isdir(os.path.join(path, STATE)):
        return path
    ckpt = Checkpointer(path, read_only=True)
    try:
        step = ckpt.best_step()
    finally:
        ckpt.close()
    if step is None:
        raise ValueError(f"{path}: no complete checkpoint in this directory")
    return os.path.join(path, str(step))


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The RunConfig dict stored with a checkpoint (a checkpoint directory or one step in it)."""
    step_dir = _resolve_step_dir(os.path.abspath(os.fspath(path)))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.join(step_dir, CONFIG))


def restore_params(path: str | os.PathLike, abstract_params, param_shardings):
    """Only the parameters of a training checkpoint (directory -> its best or latest step), placed on
    `param_shardings` — e.g. to fine-tune from a pretraining run whose optimizer differed."""
    step_dir = _resolve_step_dir(os.path.abspath(os.fspath(path)))
    target = {"params": _abstract(abstract_params, param_shardings)}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            os.path.join(step_dir, STATE),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    return restored["params"]
