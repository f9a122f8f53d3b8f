"""What a running stage reports: each step's metrics brought to the host one step late (so dispatch stays
asynchronous), recorded, shown (progress bar, or one `StageReporter.step` event per `log_every` steps),
written to TensorBoard, with throughput and MFU, and the stop on repeated non-finite steps."""

from __future__ import annotations

import logging
import os
import time

import jax

from bart_jax.config import BartConfig
from bart_jax.train import flops as flops_lib

logger = logging.getLogger(__name__)


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
        speed: `tokens_per_s` and `mfu` since the previous event."""
        logger.info("%s", step_line(stage, step_no, metrics, speed))


def resumed_line(stage: str, step: int, directory: str) -> str:
    """The one wording of a `StageReporter.resumed` event, logged or printed."""
    return f"{stage}: resumed from step {step} ({directory})"


def step_line(stage: str, step_no: int, metrics: dict[str, float], speed: dict[str, float]) -> str:
    """The one wording of a `StageReporter.step` event, logged or printed."""
    return (f"{stage} step {step_no}: loss {metrics['loss']:.4f} lr {metrics['learning_rate']:.3e} "
            f"tok/s {speed['tokens_per_s']:.0f} mfu {100 * speed['mfu']:.1f}%")


class _Meter:
    """Throughput (source + target positions, padding included) and MFU since the last report."""

    def __init__(self, model_config: BartConfig, peak: float):
        self.model_config, self.peak = model_config, peak
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def tick(self, batch: int, source_length: int, target_length: int):
        self.tokens += batch * (source_length + target_length)
        self.flops += flops_lib.train_step_flops(self.model_config, batch, source_length, target_length)

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"tokens_per_s": self.tokens / dt, "mfu": self.flops / dt / self.peak if self.peak > 0 else 0.0}
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0
        return out


def global_shape(local: dict, stage: str) -> tuple[int, int, int]:
    """(global batch rows, source length, target length) of a local batch."""
    rows = next(iter(local.values())).shape[0] * jax.process_count()
    if stage == "pretrain":
        length = local["tokens"].shape[1]
        return rows, length, length
    return rows, local["input_ids"].shape[1], local["labels"].shape[1]


class Progress:
    """The reporting of one stage's steps `start`..`end` (`train`: its TrainConfig; `peak`: the peak FLOP/s
    of all devices, for MFU; `reporter`: told about settled steps when the bar is off). `losses` holds every
    settled step's training loss, in order."""

    def __init__(self, stage: str, train, model_config: BartConfig, peak: float, run_dir: str, start: int,
                 end: int, reporter: StageReporter):
        self.stage, self.train, self.end, self.reporter = stage, train, end, reporter
        self.losses: list[float] = []
        self.meter = _Meter(model_config, peak)
        self.main_process = jax.process_index() == 0
        self.writer = self.bar = None
        if self.main_process:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            if train.progress_bar:
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
        if step_no % self.train.log_every == 0 or step_no == self.end:
            self._show(step_no, m, self.meter.read())
        return m

    def _show(self, step_no: int, m: dict[str, float], speed: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}",
                                 tok_s=f"{speed['tokens_per_s']:.0f}", mfu=f"{100 * speed['mfu']:.1f}%")
        if self.writer is not None:
            for k in ("loss", "nll", "accuracy", "grad_norm", "learning_rate"):
                self.writer.add_scalar(f"train/{k}", m[k], step_no)
            self.writer.add_scalar("train/tokens_per_s", speed["tokens_per_s"], step_no)
            self.writer.add_scalar("train/mfu", speed["mfu"], step_no)
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
