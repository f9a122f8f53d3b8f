"""A stage's progress events: the library hands them to a `StageReporter`; the command line prints them."""

from __future__ import annotations

import logging
import types

import numpy as np

from bart_jax.cli.train import PrintedStageReporter
from bart_jax.config import BartConfig
from bart_jax.train.progress import Progress, StageReporter


class _Recorder(StageReporter):
    def __init__(self):
        self.steps = []

    def step(self, stage, step_no, metrics, speed):
        self.steps.append((stage, step_no, metrics["loss"], sorted(speed)))


def _metrics(loss: float) -> dict:
    names = ("loss", "nll", "accuracy", "grad_norm", "learning_rate", "nonfinite_streak", "nonfinite_total")
    return {k: np.float32(loss if k == "loss" else 0.0) for k in names}


def test_settled_steps_go_to_the_reporter_every_log_every_steps_and_at_the_end(tmp_path):
    train = types.SimpleNamespace(progress_bar=False, steps=5, log_every=2, max_nonfinite=3)
    recorder = _Recorder()
    progress = Progress("pretrain", train, BartConfig(), 1e12, str(tmp_path), 0, 5, recorder)
    try:
        for step_no in range(1, 6):
            progress.settle(step_no, _metrics(float(step_no)), (4, 16, 16), lambda: "none")
    finally:
        progress.close()
    assert recorder.steps == [("pretrain", n, float(n), ["mfu", "tokens_per_s"]) for n in (2, 4, 5)]
    assert progress.losses == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_the_command_line_prints_the_lines_the_default_reporter_logs(capsys, caplog):
    metrics, speed = {"loss": 1.23456, "learning_rate": 1e-3}, {"tokens_per_s": 1234.4, "mfu": 0.0123}
    printed = PrintedStageReporter()
    printed.resumed("pretrain", 7, "/runs/x/checkpoints")
    printed.step("pretrain", 8, metrics, speed)
    lines = ["pretrain: resumed from step 7 (/runs/x/checkpoints)",
             "pretrain step 8: loss 1.2346 lr 1.000e-03 tok/s 1234 mfu 1.2%"]
    assert capsys.readouterr().out.splitlines() == lines
    with caplog.at_level(logging.INFO, logger="bart_jax.train.progress"):
        StageReporter().resumed("pretrain", 7, "/runs/x/checkpoints")
        StageReporter().step("pretrain", 8, metrics, speed)
    assert [r.getMessage() for r in caplog.records] == lines
    assert capsys.readouterr().out == ""
