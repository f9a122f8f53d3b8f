"""`bart-jax pretrain|finetune --config FILE [--variant NAME] [--allow-config-change] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import sys

import jax

from bart_jax.train import distributed
from bart_jax.train.checkpoint import saved_steps
from bart_jax.train.config import RunConfig, load_config
from bart_jax.train.loop import run_stage
from bart_jax.train.progress import StageReporter, TrainingDiverged, resumed_line, step_line
from bart_jax.train.resume import ALLOW_CONFIG_CHANGE_HELP


class PrintedStageReporter(StageReporter):
    """A training stage's resume and step lines on stdout (the steps only when its progress bar is off)."""

    def resumed(self, stage: str, step: int, directory: str) -> None:
        print(resumed_line(stage, step, directory), flush=True)

    def step(self, stage: str, step_no: int, metrics: dict[str, float], speed: dict[str, float]) -> None:
        print(step_line(stage, step_no, metrics, speed), flush=True)


def cli_pretrain(argv: list[str]) -> int:
    return _cli("pretrain", argv)


def cli_finetune(argv: list[str]) -> int:
    return _cli("finetune", argv)


def _cli(stage: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"bart-jax {stage}",
        description=f"{stage} BART. Overrides are dotted keys of the run config, e.g. {stage}.train.steps=100 "
                    "model.dtype=bfloat16 mesh.fsdp=4.")
    parser.add_argument("--config", help="run config: a bundled name (tiny, base, large) or a YAML path "
                        "(default: tiny, the main job's)")
    parser.add_argument("--variant", help="named bundle of overrides from the config's `variants` section")
    parser.add_argument("--allow-config-change", action="store_true", help=ALLOW_CONFIG_CHANGE_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    # User errors (config, data, paths) reach the `bart-jax` dispatcher: one line, exit code 2.
    cfg = load_config(args.config, args.overrides, args.variant)  # (run_stage checks it before any work)

    def job_lost(e: distributed.JobLost) -> None:  # from the thread that noticed; the process ends right after
        print(f"bart-jax {stage}: error: {e}{_last_checkpoint(cfg, stage) if e.restart else ''}", file=sys.stderr,
              flush=True)

    distributed.report_job_lost_with(job_lost)
    try:
        result = run_stage(cfg, stage, allow_config_change=args.allow_config_change,
                           reporter=PrintedStageReporter())
    except TrainingDiverged as e:
        print(f"bart-jax {stage}: {e}", file=sys.stderr)
        return 1
    except RuntimeError:
        distributed.await_job_lost()  # a collective with a process that died fails first: its line, no traceback
        raise
    if jax.process_index() == 0:
        print(json.dumps({"stage": stage, "final_step": result.final_step,
                          "last_loss": result.losses[-1] if result.losses else None,
                          "eval": result.eval_metrics, "checkpoints": result.checkpoint_dir,
                          "best_step": result.best_step, "model_dir": result.model_dir}))
    return 0


def _last_checkpoint(cfg: RunConfig, stage: str) -> str:
    """' (step N in DIR)': the checkpoint a restarted stage resumes from."""
    directory = cfg.checkpoint_dir(stage)
    steps = saved_steps(directory)
    return f" (step {steps[-1]} in {directory})" if steps else " (none saved yet: the stage starts over)"
