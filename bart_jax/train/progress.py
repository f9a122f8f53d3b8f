"""What a running stage reports: each step's metrics brought to the host one step late (so dispatch stays
asynchronous), recorded, shown, written to TensorBoard, with throughput (and MFU where the devices have a
datasheet peak), and the stop on repeated non-finite steps.

Shown as a progress bar only on a terminal; with the bar off, one `StageReporter.step` event per `log_every`
steps; with the bar on but stdout or stderr not a terminal (a log file, a pipe), one event per tenth of the
stage or per `PLAIN_PROGRESS_SECONDS`, whichever comes first, instead of redrawn bar frames.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import jax

from bart_jax.config import BartConfig
from bart_jax.train import flops as flops_lib

logger = logging.getLogger(__name__)

PLAIN_PROGRESS_SECONDS = 60.0  # longest time between two plain progress lines


class TrainingDiverged(RuntimeError):
    """Raised when `max_nonfinite` consecutive steps had a NaN/inf loss or gradient."""


class StageReporter:
    """What a training stage tells its caller, on the main process only. This default logs each event;
    `bart-jax pretrain|finetune|run` (bart_jax.cli.train.PrintedStageReporter) prints them."""

    def resumed(self, stage: str, step: int, directory: str) -> None:
        """The stage restored its state from checkpoint `step` in `directory`."""
        logger.info("%s", resumed_line(stage, step, directory))

    def step(self, stage: str, step_no: int, metrics: dict[str, float], speed: dict[str, float]) -> None:
        """Step `step_no` settled (every `log_every` steps and the last; only when the progress bar is off,
        since the bar shows them). metrics: the step's host floats (`loss`, `learning_rate`, ...);
        speed: `tokens_per_s` since the previous event, and `mfu` where the devices have a datasheet peak."""
        logger.info("%s", step_line(stage, step_no, metrics, speed))


def resumed_line(stage: str, step: int, directory: str) -> str:
    """The one wording of a `StageReporter.resumed` event, logged or printed."""
    return f"{stage}: resumed from step {step} ({directory})"


def step_line(stage: str, step_no: int, metrics: dict[str, float], speed: dict[str, float]) -> str:
    """The one wording of a `StageReporter.step` event, logged or printed."""
    line = (f"{stage} step {step_no}: loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.3e} "
            f"tok/s {speed['tokens_per_s']:.0f}")
    return line + (f" mfu {100 * speed['mfu']:.1f}%" if "mfu" in speed else "")


class _Meter:
    """Throughput (source + target positions, padding included) and MFU since the last report.

    peak: the peak FLOP/s of all devices from their datasheets, or None (no MFU: a timed matmul is no peak).
    An MFU above 100% means the peak is wrong for these devices: it is not reported, and a warning says so
    once per stage."""

    def __init__(self, model_config: BartConfig, peak: float | None):
        self.model_config, self.peak = model_config, peak
        self.warned = False
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def tick(self, batch: int, source_length: int, target_length: int):
        self.tokens += batch * (source_length + target_length)
        self.flops += flops_lib.train_step_flops(self.model_config, batch, source_length, target_length)

    def read(self) -> dict[str, float]:
        """{'tokens_per_s'} since the last read, with 'mfu' (a fraction <= 1) where it is known."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt}
        rate = self.flops / dt
        if self.peak:
            if rate <= self.peak:
                out["mfu"] = rate / self.peak
            elif not self.warned:
                self.warned = True
                logger.warning("model FLOP rate %.4g FLOP/s exceeds the stated peak %.4g FLOP/s: MFU not shown",
                               rate, self.peak)
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0
        return out


def is_terminal(stream) -> bool:
    """Whether `stream` is an interactive terminal (a closed or replaced stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def global_shape(local: dict, stage: str) -> tuple[int, int, int]:
    """(global batch rows, source length, target length) of a local batch."""
    rows = next(iter(local.values())).shape[0] * jax.process_count()
    if stage == "pretrain":
        length = local["tokens"].shape[1]
        return rows, length, length
    return rows, local["input_ids"].shape[1], local["labels"].shape[1]


class Progress:
    """The reporting of one stage's steps `start`..`end` (`train`: its TrainConfig; `peak`: the datasheet peak
    FLOP/s of all devices, or None: no MFU; `reporter`: told about settled steps when no bar is drawn).
    `losses` holds every settled step's training loss, in order."""

    def __init__(self, stage: str, train, model_config: BartConfig, peak: float | None, run_dir: str, start: int,
                 end: int, reporter: StageReporter):
        self.stage, self.train, self.end, self.reporter = stage, train, end, reporter
        self.losses: list[float] = []
        self.meter = _Meter(model_config, peak)
        self.main_process = jax.process_index() == 0
        self.writer = self.bar = None
        # With the bar asked for but no terminal to draw it on: plain events every tenth or interval.
        self.plain_every = (max(1, math.ceil(train.steps / 10))
                            if train.progress_bar and not (is_terminal(sys.stdout) and is_terminal(sys.stderr))
                            else None)
        self.last_plain = time.monotonic()
        if self.main_process:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            if train.progress_bar and self.plain_every is None:
                from tqdm import tqdm

                self.bar = tqdm(total=train.steps, initial=start, desc=stage, dynamic_ncols=True)

    def settle(self, step_no: int, metrics, shape: tuple[int, int, int], last_checkpoint) -> dict[str, float]:
        """Bring a finished step's metrics to the host: record and show them; raise TrainingDiverged on
        `max_nonfinite` consecutive NaN/inf steps (`last_checkpoint`: a callable giving where to restart)."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.losses.append(m["loss"])
        self.meter.tick(*shape)
        if m["nonfinite_streak"] >= self.train.max_nonfinite:
            raise TrainingDiverged(
                f"{self.stage}: {int(m['nonfinite_streak'])} consecutive steps with a non-finite loss or gradient "
                f"(up to step {step_no}; {int(m['nonfinite_total'])} skipped in all). Stopped; the last good "
                f"checkpoint is {last_checkpoint()}.")
        if self.bar is not None:
            self.bar.update(1)
        if self._due(step_no):
            self._show(step_no, m, self.meter.read())
        return m

    def _due(self, step_no: int) -> bool:
        """Whether settled step `step_no` is shown: every `log_every` steps (the bar, or the bar off), every
        tenth of the stage or `PLAIN_PROGRESS_SECONDS` (plain lines instead of a bar), and the last step."""
        if step_no == self.end:
            return True
        if self.plain_every is None:
            return step_no % self.train.log_every == 0
        if step_no % self.plain_every == 0 or time.monotonic() - self.last_plain >= PLAIN_PROGRESS_SECONDS:
            self.last_plain = time.monotonic()
            return True
        return False

    def _show(self, step_no: int, m: dict[str, float], speed: dict[str, float]) -> None:
        if self.bar is not None:
            mfu = {"mfu": f"{100 * speed['mfu']:.1f}%"} if "mfu" in speed else {}
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}",
                                 tok_s=f"{speed['tokens_per_s']:.0f}", **mfu)
        if self.writer is not None:
            for k in ("loss", "nll", "accuracy", "grad_norm", "learning_rate"):
                self.writer.add_scalar(f"train/{k}", m[k], step_no)
            for k in ("tokens_per_s", "mfu"):
                if k in speed:
                    self.writer.add_scalar(f"train/{k}", speed[k], step_no)
            self.writer.add_scalar("train/skipped_total", m["nonfinite_total"], step_no)
        if self.bar is None and self.main_process:
            self.reporter.step(self.stage, step_no, m, speed)

    def show_eval(self, step_no: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k.removeprefix('eval_')}", v, step_no)
        if self.bar is not None:
            self.bar.write(f"{self.stage} step {step_no}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
