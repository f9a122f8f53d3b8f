"""The main job: tokenizer -> denoising pretraining -> fine-tuning -> beam search -> ROUGE, in one run directory.

It also fine-tunes the same model from random initialisation with the same budget and scores the lead
baseline (the document's first sentence), so the printout shows whether pretraining helped.

    bart-jax run                          # the bundled `tiny` config on the built-in corpus, ~8 minutes on 2 CPU cores
    bart-jax run --quick                  # a smoke-sized run (< 2 minutes), used by the test suite
    bart-jax run --config base --workdir runs/base mesh.fsdp=8 ...   # same job, bigger config
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Sequence

DEFAULT_CONFIG = "tiny"  # bundled in bart_jax/configs (package data), so a wheel install runs it too

# --quick: every stage runs for real, just briefly (the test suite runs this end to end).
QUICK_OVERRIDES = (
    "pretrain.train.steps=30", "pretrain.train.batch_size=8", "pretrain.train.source_length=64",
    "pretrain.train.eval_every=15", "pretrain.train.checkpoint_every=15", "pretrain.train.log_every=5",
    "pretrain.schedule.warmup_steps=5",
    "finetune.train.steps=20", "finetune.train.batch_size=8", "finetune.train.source_length=64",
    "finetune.train.target_length=24", "finetune.train.eval_every=10", "finetune.train.checkpoint_every=10",
    "finetune.train.log_every=5", "finetune.schedule.warmup_steps=4",
)
QUICK_TEST_PAIRS = 16

SCRATCH_RUN = "finetune_scratch"


@dataclasses.dataclass
class JobResult:
    """What the main job produced: ROUGE per system, losses per stage, and where everything is."""

    workdir: str
    rouge: dict[str, dict[str, float]]  # system -> {rouge1, rouge2, rougeL, rougeLsum}
    denoiser: dict  # the pretrained model as a denoiser (bart_jax.train.denoiser.DenoiserReport fields)
    losses: dict[str, list[float]]  # stage -> training losses
    predictions: dict[str, str]  # system -> predictions file
    model_dirs: dict[str, str]
    summary_path: str


def lead_summary(document: str, max_words: int) -> str:
    """The lead baseline: the document's first sentence, cut to `max_words` words."""
    from bart_jax.data.loader import split_sentences

    sentences = split_sentences(document)
    words = (sentences[0] if sentences else document).split()
    return " ".join(words[:max_words])


def evaluate_denoiser(cfg, model_dir: str, num_batches: int):
    """The pretrained model in `model_dir` as a denoiser on the pretraining validation split."""
    from bart_jax.convert import from_pretrained
    from bart_jax.data import load_tokenizer
    from bart_jax.train.denoiser import measure_denoiser
    from bart_jax.train.loop import noise_batch_fns, prepared_dataset, stage_batches

    config, params = from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    batches = stage_batches(cfg, "pretrain", tok, prepared_dataset(cfg, "pretrain"), cfg.pretrain.train.batch_size,
                            cfg.data.eval_split, shuffle=False)
    _, eval_noise = noise_batch_fns(cfg, tok)
    return measure_denoiser(config, params, tok, batches, eval_noise, num_batches)


def _print_denoiser(report) -> None:
    print(f"  as a denoiser on {report.tokens} validation tokens (teacher-forced token accuracy):")
    print(f"    reconstructing clean text from clean input  {100 * report.clean_accuracy:5.1f}%")
    print(f"    reconstructing clean text from noised input {100 * report.noised_accuracy:5.1f}%   "
          f"(copying the noised input: {100 * report.copy_accuracy:.1f}%)")
    for key in ("clean", "noised", "reconstruction"):
        print(f"    {key + ':':<16}{_cut(report.example.get(key, ''), 300)}")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _print_examples(pairs: list[dict], systems: dict[str, list[str]], count: int) -> None:
    print(f"\nThe first {min(count, len(pairs))} test examples:")
    for i, pair in enumerate(pairs[:count]):
        print(f"  [{i + 1}] document:  {_cut(pair['document'], 240)}")
        print(f"      reference: {pair['summary']}")
        for name, predictions in systems.items():
            print(f"      {name.split(' (')[0] + ':':<23}{predictions[i]}")


def _stage_banner(number: int, title: str):
    print(f"\n[{number}/5] {title}", flush=True)


def split_pairs(cfg, split: str, limit: int | None = None) -> list[dict]:
    """{'document', 'summary'} pairs of a split of the run's fine-tuning data."""
    from bart_jax.decode.cli import read_pairs
    from bart_jax.train.loop import prepared_dataset

    dataset = prepared_dataset(cfg, "finetune")
    pairs = read_pairs(str(dataset.path), split, limit)
    if not pairs:
        raise ValueError(f"the fine-tuning data {cfg.data.finetune_source!r} has no {split} pairs")
    return pairs


def summary_controls(cfg) -> dict:
    """The beam search the main job scores with."""
    return dict(num_beams=4, max_length=cfg.finetune.train.target_length, min_length=3, length_penalty=1.0,
                no_repeat_ngram_size=3, early_stopping=True)


def summarize_documents(model_dir: str, documents: list[str], controls: dict, batch_size: int,
                        bar=None) -> list[str]:
    """The best beam of `controls`' search for each document, with the model and tokenizer in `model_dir`."""
    from bart_jax.decode.cli import generate_texts, load_model_for_inference

    config, params, tokenizer = load_model_for_inference(model_dir)
    summaries = []
    for texts, _ in generate_texts(documents, config, params, tokenizer, controls, batch_size):
        summaries.append(texts[0])
        if bar is not None:
            bar.update(1)
    return summaries


def lead_summaries(documents: list[str], references: list[str]) -> list[str]:
    """The lead baseline with as many words as an average reference has."""
    mean_words = max(1, round(sum(len(r.split()) for r in references) / len(references)))
    return [lead_summary(d, mean_words) for d in documents]


def run_main_job(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                 quick: bool = False, workdir: str | None = None, batch_size: int = 16,
                 allow_config_change: bool = False) -> JobResult:
    """Run the whole job and return its results (also printed, and written to `<workdir>/summary.json`).

    The whole config is checked before any work, and the run directory is locked for the whole job.
    allow_config_change: let a rerun resume training stages whose settings changed (see `pretrain`)."""
    from bart_jax.runlock import run_directory_lock
    from bart_jax.train.config import check_run_config, load_config

    all_overrides = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    if workdir:
        all_overrides.append(f"workdir={workdir}")
    cfg = load_config(config_path or DEFAULT_CONFIG, all_overrides)
    check_run_config(cfg)
    with run_directory_lock(cfg.workdir):
        return _run_main_job(cfg, config_path, quick, batch_size, allow_config_change)


def _run_main_job(cfg, config_path, quick: bool, batch_size: int, allow_config_change: bool) -> JobResult:
    from tqdm import tqdm

    from bart_jax.decode.rouge import rouge_scores
    from bart_jax.train.config import apply_overrides
    from bart_jax.train.loop import finetune, load_or_train_tokenizer, pretrain

    started = time.perf_counter()
    print(f"bart_jax main job: config {config_path or DEFAULT_CONFIG}, run directory {os.path.abspath(cfg.workdir)}")

    _stage_banner(1, "tokenizer")
    tok, tokenizer_dir = load_or_train_tokenizer(cfg)
    print(f"  SentencePiece tokenizer with {tok.vocab_size} pieces in {tokenizer_dir}")

    _stage_banner(2, "denoising pretraining")
    pre = pretrain(cfg, allow_config_change=allow_config_change)
    denoiser = evaluate_denoiser(cfg, pre.model_dir, num_batches=2 if quick else 8)
    _print_denoiser(denoiser)
    _stage_banner(3, "fine-tuning from the pretrained model")
    fine = finetune(cfg, allow_config_change=allow_config_change)
    _stage_banner(4, "fine-tuning from random initialisation (same budget, for comparison)")
    scratch_cfg = apply_overrides(cfg, ["finetune.init_from=null", f"finetune.run_name={SCRATCH_RUN}"])
    scratch = finetune(scratch_cfg, allow_config_change=allow_config_change)

    _stage_banner(5, "beam search on the test split and ROUGE")
    pairs = split_pairs(cfg, "test", QUICK_TEST_PAIRS if quick else None)
    documents = [p["document"] for p in pairs]
    references = [p["summary"] for p in pairs]
    target_len = cfg.finetune.train.target_length
    controls = summary_controls(cfg)
    with tqdm(total=2 * len(documents), desc="beam search", unit="doc", dynamic_ncols=True) as bar:
        systems = {
            "pretrained+finetuned": summarize_documents(fine.model_dir, documents, controls, batch_size, bar),
            "random-init finetuned": summarize_documents(scratch.model_dir, documents, controls, batch_size, bar),
            "lead (first sentence)": lead_summaries(documents, references),
        }
    results_dir = os.path.join(cfg.workdir, "results")
    os.makedirs(results_dir, exist_ok=True)
    rouge, prediction_files = {}, {}
    for name, predictions in systems.items():
        rouge[name] = rouge_scores(predictions, references)
        path = os.path.join(results_dir, "predictions." + name.split()[0].replace("+", "_") + ".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for pair, prediction in zip(pairs, predictions):
                f.write(json.dumps({"document": pair["document"], "reference": pair["summary"],
                                    "prediction": prediction}) + "\n")
        prediction_files[name] = path

    result = JobResult(
        workdir=os.path.abspath(cfg.workdir), rouge=rouge, denoiser=dataclasses.asdict(denoiser),
        losses={"pretrain": pre.losses, "finetune": fine.losses, SCRATCH_RUN: scratch.losses},
        predictions=prediction_files,
        model_dirs={"pretrain": pre.model_dir, "finetune": fine.model_dir, SCRATCH_RUN: scratch.model_dir},
        summary_path=os.path.join(results_dir, "summary.json"))
    with open(result.summary_path, "w") as f:
        json.dump({**dataclasses.asdict(result), "test_pairs": len(pairs), "controls": controls,
                   "seconds": round(time.perf_counter() - started, 1)}, f, indent=2)

    print(f"\nROUGE F1 (%) on {len(pairs)} test pairs "
          f"(beam 4, no_repeat_ngram_size 3, max_length {target_len}):")
    print(f"  {'system':<24}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'ROUGE-Lsum':>12}")
    for name, m in rouge.items():
        print(f"  {name:<24}{m['rouge1']:>9.2f}{m['rouge2']:>9.2f}{m['rougeL']:>9.2f}{m['rougeLsum']:>12.2f}")
    for stage, losses in result.losses.items():
        if losses:
            print(f"  {stage} loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    _print_examples(pairs, systems, count=3)
    print(f"\nEverything is in {result.workdir}: checkpoints and TensorBoard logs under pretrain/, finetune/, "
          f"{SCRATCH_RUN}/; predictions and summary.json under results/. "
          f"({time.perf_counter() - started:.0f}s)")
    return result


def cli_main(argv: Sequence[str]) -> int:
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
    run_main_job(args.config, args.overrides, quick=args.quick, workdir=args.workdir, batch_size=args.batch_size,
                 allow_config_change=args.allow_config_change)
    return 0
