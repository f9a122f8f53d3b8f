"""`bart-jax run`: the main job (bart_jax.pipeline) with its printout: stage banners, the pretrained model as a
denoiser, the ROUGE table against the lead baseline, the losses and three test examples."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Sequence

from bart_jax.cli.train import PrintedStageReporter
from bart_jax.errors import UserError
from bart_jax.pipeline import DEFAULT_CONFIG, SCRATCH_RUN, STAGES, JobProgress, JobResult, run_main_job

EXAMPLES = 3  # test examples shown at the end


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


class PrintedProgress(PrintedStageReporter, JobProgress):
    """The main job's progress on stdout, its training stages' lines included."""

    def started(self, config_name: str, workdir: str) -> None:
        print(f"bart_jax main job: config {config_name}, run directory {workdir}")

    def stage(self, number: int, title: str) -> None:
        print(f"\n[{number}/{STAGES}] {title}", flush=True)

    def tokenizer_ready(self, vocab_size: int, directory: str) -> None:
        print(f"  SentencePiece tokenizer with {vocab_size} pieces in {directory}")

    def denoiser_measured(self, report) -> None:
        print(f"  as a denoiser on {report.tokens} validation tokens (teacher-forced token accuracy):")
        print(f"    reconstructing clean text from clean input  {100 * report.clean_accuracy:5.1f}%")
        print(f"    reconstructing clean text from noised input {100 * report.noised_accuracy:5.1f}%   "
              f"(copying the noised input: {100 * report.copy_accuracy:.1f}%)")
        for key in ("clean", "noised", "reconstruction"):
            print(f"    {key + ':':<16}{_cut(report.example.get(key, ''), 300)}")


def _print_examples(predictions: dict[str, str], count: int) -> None:
    """The first `count` rows of the systems' predictions files: document, reference, each system's summary."""
    rows = {}
    for name, path in predictions.items():
        with open(path, encoding="utf-8") as f:
            rows[name] = [json.loads(line) for line in itertools.islice(f, count)]
    first = next(iter(rows.values()), [])
    print(f"\nThe first {len(first)} test examples:")
    for i, row in enumerate(first):
        print(f"  [{i + 1}] document:  {_cut(row['document'], 240)}")
        print(f"      reference: {row['reference']}")
        for name, system_rows in rows.items():
            print(f"      {name.split(' (')[0] + ':':<23}{system_rows[i]['prediction']}")


def print_results(result: JobResult, seconds: float) -> None:
    """The ROUGE table, each stage's loss, three examples and where everything is."""
    c = result.controls
    print(f"\nROUGE F1 (%) on {result.test_pairs} test pairs (beam {c['num_beams']}, no_repeat_ngram_size "
          f"{c['no_repeat_ngram_size']}, max_length {c['max_length']}):")
    print(f"  {'system':<24}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'ROUGE-Lsum':>12}")
    for name, m in result.rouge.items():
        print(f"  {name:<24}{m['rouge1']:>9.2f}{m['rouge2']:>9.2f}{m['rougeL']:>9.2f}{m['rougeLsum']:>12.2f}")
    for stage, losses in result.losses.items():
        if losses:
            print(f"  {stage} loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    _print_examples(result.predictions, EXAMPLES)
    print(f"\nEverything is in {result.workdir}: checkpoints and TensorBoard logs under pretrain/, finetune/, "
          f"{SCRATCH_RUN}/; predictions and summary.json under results/. ({seconds:.0f}s)")


def run_and_print(config_path=None, overrides: Sequence[str] = (), **kwargs) -> JobResult:
    """`run_main_job` (same arguments) with the printout of `bart-jax run`."""
    started = time.perf_counter()
    result = run_main_job(config_path, overrides, progress=PrintedProgress(), **kwargs)
    print_results(result, time.perf_counter() - started)
    return result


def cli_run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bart-jax run",
        description="The main job: tokenizer -> pretrain -> fine-tune (and a random-init control) -> beam "
                    "search -> ROUGE against the lead baseline.")
    parser.add_argument("--config", default=None,
                        help=f"run config: a bundled name (tiny, base, large) or a YAML path (default {DEFAULT_CONFIG})")
    parser.add_argument("--workdir", default=None, help="run directory (default: the config's workdir)")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (under 2 minutes)")
    parser.add_argument("--batch-size", type=int, default=16, help="documents per beam-search batch")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume training stages even if their settings changed (logged)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides")
    args = parser.parse_args(list(argv))
    # User errors and interruptions reach the `bart-jax` dispatcher (one line, exit code 2 / 130 / 143).
    if args.batch_size < 1:  # (used only after training: checked before it)
        raise UserError(f"--batch-size={args.batch_size}: must be >= 1")
    run_and_print(args.config, args.overrides, quick=args.quick, workdir=args.workdir, batch_size=args.batch_size,
                  allow_config_change=args.allow_config_change)
    return 0
