"""A stage's progress events: the library hands them to a `StageReporter`; the command line prints them."""

from __future__ import annotations

import logging
import types

import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax.cli.train import PrintedStageReporter
from bart_jax.config import BartConfig
from bart_jax.train import flops
from bart_jax.train import progress as progress_lib
from bart_jax.train.progress import Progress, StageReporter, step_line


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
    progress = Progress("pretrain", train, BartConfig(), 1e30, str(tmp_path), 0, 5, recorder)
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


def _train(**kw):
    return types.SimpleNamespace(**{"progress_bar": False, "steps": 5, "log_every": 2, "max_nonfinite": 3, **kw})


def _run(progress, steps):
    try:
        for step_no in range(1, steps + 1):
            progress.settle(step_no, _metrics(float(step_no)), (4, 16, 16), lambda: "none")
    finally:
        progress.close()


def test_without_a_datasheet_peak_progress_shows_tokens_per_second_alone(tmp_path):
    """A CPU (or an unlisted GPU) has no datasheet peak: the events and their line carry no MFU."""
    assert flops.datasheet_peak(jnp.float32) is None  # this machine's CPU
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert flops.datasheet_peak(jnp.bfloat16, h100).flops_per_s == pytest.approx(989.4e12)
    recorder = _Recorder()
    _run(Progress("pretrain", _train(), BartConfig(), None, str(tmp_path), 0, 5, recorder), 5)
    assert [speed for *_, speed in recorder.steps] == [["tokens_per_s"]] * 3
    line = step_line("pretrain", 8, {"loss": 1.0, "learning_rate": 1e-3}, {"tokens_per_s": 1234.4})
    assert line == "pretrain step 8: loss 1.0000 lr 1.000e-03 tok/s 1234"


def test_an_mfu_above_100_percent_is_never_shown_and_warned_about_once(tmp_path, caplog):
    recorder = _Recorder()
    with caplog.at_level(logging.WARNING, logger="bart_jax.train.progress"):
        _run(Progress("pretrain", _train(), BartConfig(), 1.0, str(tmp_path), 0, 5, recorder), 5)
    assert [speed for *_, speed in recorder.steps] == [["tokens_per_s"]] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "exceeds the stated peak" in warnings[0]


def test_without_a_terminal_the_bar_becomes_plain_lines_each_tenth(tmp_path, capsys, monkeypatch):
    """Output to a file or a pipe: no carriage-return frames, one event per tenth of the stage and the last."""
    monkeypatch.setattr(progress_lib, "PLAIN_PROGRESS_SECONDS", 1e9)
    recorder = _Recorder()
    _run(Progress("pretrain", _train(progress_bar=True, steps=25), BartConfig(), None, str(tmp_path), 0, 25,
                  recorder), 25)
    assert [n for _, n, *_ in recorder.steps] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err


def test_without_a_terminal_a_plain_line_comes_at_least_every_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_lib, "PLAIN_PROGRESS_SECONDS", 0.0)
    recorder = _Recorder()
    _run(Progress("pretrain", _train(progress_bar=True, steps=100), BartConfig(), None, str(tmp_path), 0, 4,
                  recorder), 4)
    assert [n for _, n, *_ in recorder.steps] == [1, 2, 3, 4]


def test_on_a_terminal_the_bar_is_drawn_instead_of_events(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_lib, "is_terminal", lambda stream: True)
    recorder = _Recorder()
    progress = Progress("pretrain", _train(progress_bar=True), BartConfig(), None, str(tmp_path), 0, 5, recorder)
    assert progress.bar is not None
    _run(progress, 5)
    assert recorder.steps == []
