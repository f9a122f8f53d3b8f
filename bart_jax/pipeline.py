"""The main job: tokenizer -> denoising pretraining -> fine-tuning -> beam search -> ROUGE, in one run directory.

It also fine-tunes the same model from random initialisation with the same budget and scores the lead
baseline (the document's first sentence), so the printout shows whether pretraining helped.

    bart-jax run                          # the bundled `tiny` config on the built-in corpus, ~9 minutes on 2 CPU cores
    bart-jax run --quick                  # a smoke-sized run (< 2 minutes), used by the test suite
    bart-jax run --config base --workdir runs/base mesh.fsdp=8 ...   # same job, bigger config

`run_main_job` reports its progress (its training stages' too) to a `JobProgress` (by default: log lines);
`bart-jax run` (bart_jax.cli.run) prints it and the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Sequence

from bart_jax.errors import Interrupted, Terminated, UserError
from bart_jax.train.config import DEFAULT_CONFIG
from bart_jax.train.progress import StageReporter

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
STAGES = 5

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class JobResult:
    """What the main job produced: ROUGE per system, losses per stage, and where everything is (the fields
    are also what `<workdir>/results/summary.json` holds)."""

    workdir: str
    rouge: dict[str, dict[str, float]]  # system -> {rouge1, rouge2, rougeL, rougeLsum}
    denoiser: dict  # the pretrained model as a denoiser (bart_jax.train.denoiser.DenoiserReport fields)
    losses: dict[str, list[float]]  # stage -> training losses
    predictions: dict[str, str]  # system -> predictions file (bart_jax.decode.files.write_predictions)
    model_dirs: dict[str, str]
    summary_path: str
    test_pairs: int
    controls: dict  # the beam search scored (`summary_controls`)
    seconds: float


class JobProgress(StageReporter):
    """What the main job reports while it runs, its training stages' events included (`StageReporter`).
    This default logs each event; `bart-jax run` prints them."""

    def started(self, config_name: str, workdir: str) -> None:
        logger.info("main job: config %s, run directory %s", config_name, workdir)

    def stage(self, number: int, title: str) -> None:
        logger.info("[%d/%d] %s", number, STAGES, title)

    def tokenizer_ready(self, vocab_size: int, directory: str) -> None:
        logger.info("SentencePiece tokenizer with %d pieces in %s", vocab_size, directory)

    def denoiser_measured(self, report) -> None:
        """report: a bart_jax.train.denoiser.DenoiserReport of the pretrained model."""
        logger.info("as a denoiser: clean %.3f, noised %.3f, copy baseline %.3f", report.clean_accuracy,
                    report.noised_accuracy, report.copy_accuracy)


def lead_summary(document: str, max_words: int) -> str:
    """The lead baseline: the document's first sentence, cut to `max_words` words."""
    from bart_jax.data.text import split_sentences

    sentences = split_sentences(document)
    words = (sentences[0] if sentences else document).split()
    return " ".join(words[:max_words])


def lead_summaries(documents: list[str], references: list[str]) -> list[str]:
    """The lead baseline with as many words as an average reference has."""
    mean_words = max(1, round(sum(len(r.split()) for r in references) / len(references)))
    return [lead_summary(d, mean_words) for d in documents]


def evaluate_denoiser(cfg, model_dir: str, num_batches: int):
    """The pretrained model in `model_dir` as a denoiser on the pretraining validation split."""
    from bart_jax.convert import from_pretrained
    from bart_jax.data import load_tokenizer

    config, params = from_pretrained(model_dir)
    return measure_pretrained(cfg, config, params, load_tokenizer(model_dir), num_batches)


def measure_pretrained(cfg, model_config, params, tokenizer, num_batches: int):
    """`params` (of `model_config`) as a denoiser on the first `num_batches` batches of the pretraining validation
    split, noised with the run's evaluation noise. Returns a `DenoiserReport`."""
    from bart_jax.train.denoiser import measure_denoiser
    from bart_jax.train.inputs import noise_batch_fns, prepared_dataset, stage_batches

    batches = stage_batches(cfg, "pretrain", tokenizer, prepared_dataset(cfg, "pretrain"),
                            cfg.pretrain.train.batch_size, cfg.data.eval_split, shuffle=False)
    _, eval_noise = noise_batch_fns(cfg, tokenizer, model_config.decoder_start_token_id)
    return measure_denoiser(model_config, params, tokenizer, batches, eval_noise, num_batches)


def split_pairs(cfg, split: str, limit: int | None = None) -> list[dict]:
    """{'document', 'summary'} pairs of a split of the run's fine-tuning data."""
    from bart_jax.decode.files import read_pairs
    from bart_jax.train.inputs import prepared_dataset

    dataset = prepared_dataset(cfg, "finetune")
    pairs = read_pairs(str(dataset.path), split, limit)
    if not pairs:
        raise ValueError(f"the fine-tuning data {cfg.data.finetune_source!r} has no {split} pairs")
    return pairs


def check_job_data(cfg) -> None:
    """Refuse (UserError), before any work, data the job would only fail on minutes later: a split that
    pretraining, fine-tuning or the final table (the test split) needs."""
    from bart_jax.train.inputs import check_splits, prepared_dataset

    check_splits(cfg, "pretrain", prepared_dataset(cfg, "pretrain"))
    pairs = prepared_dataset(cfg, "finetune")
    check_splits(cfg, "finetune", pairs)
    if "test" not in pairs:
        raise UserError(f"the finetune data {pairs.path} has no 'test' split (has {sorted(pairs)}): the job "
                        "scores its final table on it; add --test files to `bart-jax data pairs`")


def summary_controls(cfg) -> dict:
    """The beam search the main job scores with."""
    return dict(num_beams=4, max_length=cfg.finetune.train.target_length, min_length=3, length_penalty=1.0,
                no_repeat_ngram_size=3, early_stopping=True)


def summarize_documents(model_dir: str, documents: list[str], controls: dict, batch_size: int,
                        bar=None) -> list[str]:
    """The best beam of `controls`' search for each document, with the model and tokenizer in `model_dir`."""
    from bart_jax.decode.files import load_model_for_inference
    from bart_jax.decode.generate import generate_texts

    config, params, tokenizer = load_model_for_inference(model_dir)
    summaries = []
    for texts, _ in generate_texts(documents, config, params, tokenizer, batch_size=batch_size, **controls):
        summaries.append(texts[0])
        if bar is not None:
            bar.update(1)
    return summaries


def run_main_job(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                 quick: bool = False, workdir: str | None = None, batch_size: int = 16,
                 allow_config_change: bool = False, progress: JobProgress | None = None) -> JobResult:
    """Run the whole job and return its results (also written to `<workdir>/results/summary.json`).

    The whole config is checked before any work, and the run directory is locked for the whole job.
    allow_config_change: let a rerun resume training stages whose settings changed (see `pretrain`).
    progress: told about each stage as it starts (default: `JobProgress`, which logs)."""
    from bart_jax.runlock import run_directory_lock
    from bart_jax.train.config import load_config
    from bart_jax.train.preflight import check_run_config

    all_overrides = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    if workdir:
        all_overrides.append(f"workdir={workdir}")
    cfg = load_config(config_path, all_overrides)
    check_run_config(cfg)
    if cfg.distributed.enabled:
        raise UserError("the main job runs in one process (distributed.enabled=true given): it decodes the test "
                        "split with beam search on one host; run `bart-jax pretrain` and `bart-jax finetune` in "
                        "every process instead, then `bart-jax evaluate` in one")
    progress = _StageTracker(progress or JobProgress())
    with run_directory_lock(cfg.workdir):
        try:
            return _run_main_job(cfg, str(config_path or DEFAULT_CONFIG), quick, batch_size, allow_config_change,
                                 progress)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):
                raise  # a training stage saved what it had and said so
            # Between training stages: what the finished stages saved is kept, and a rerun picks it up.
            raise Interrupted(f"interrupted during stage {progress.number}/{STAGES} ({progress.title}); finished "
                              "stages are kept; run the same command to resume",
                              signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT) from None


class _StageTracker:
    """A JobProgress that remembers the stage the job is in (for the message of an interruption)."""

    def __init__(self, inner: JobProgress):
        self._inner, self.number, self.title = inner, 0, "starting"

    def stage(self, number: int, title: str) -> None:
        self.number, self.title = number, title
        self._inner.stage(number, title)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _run_main_job(cfg, config_name: str, quick: bool, batch_size: int, allow_config_change: bool,
                  progress: JobProgress) -> JobResult:
    from tqdm import tqdm

    from bart_jax.train.config import apply_overrides
    from bart_jax.train.inputs import load_or_train_tokenizer
    from bart_jax.train.loop import run_stage

    started = time.perf_counter()
    progress.started(config_name, os.path.abspath(cfg.workdir))
    check_job_data(cfg)
    progress.stage(1, "tokenizer")
    tok, tokenizer_dir = load_or_train_tokenizer(cfg)
    progress.tokenizer_ready(tok.vocab_size, tokenizer_dir)
    progress.stage(2, "denoising pretraining")
    # (run_main_job checked every stage's config before any work: `checked`)
    stage = dict(allow_config_change=allow_config_change, reporter=progress, checked=True)
    pre = run_stage(cfg, "pretrain", **stage)
    denoiser = evaluate_denoiser(cfg, pre.model_dir, num_batches=2 if quick else 8)
    progress.denoiser_measured(denoiser)
    progress.stage(3, "fine-tuning from the pretrained model")
    fine = run_stage(cfg, "finetune", **stage)
    progress.stage(4, "fine-tuning from random initialisation (same budget, for comparison)")
    scratch_cfg = apply_overrides(cfg, ["finetune.init_from=null", f"finetune.run_name={SCRATCH_RUN}"])
    scratch = run_stage(scratch_cfg, "finetune", **stage)

    progress.stage(5, "beam search on the test split and ROUGE")
    pairs = split_pairs(cfg, "test", QUICK_TEST_PAIRS if quick else None)
    documents = [p["document"] for p in pairs]
    controls = summary_controls(cfg)
    # (disable=None: no bar, hence no carriage-return frames, when stderr is not a terminal)
    with tqdm(total=2 * len(documents), desc="beam search", unit="doc", dynamic_ncols=True, disable=None) as bar:
        systems = {
            "pretrained+finetuned": summarize_documents(fine.model_dir, documents, controls, batch_size, bar),
            "random-init finetuned": summarize_documents(scratch.model_dir, documents, controls, batch_size, bar),
            "lead (first sentence)": lead_summaries(documents, [p["summary"] for p in pairs]),
        }
    results_dir = os.path.join(cfg.workdir, "results")
    rouge, prediction_files = _score_systems(pairs, systems, results_dir)
    result = JobResult(
        workdir=os.path.abspath(cfg.workdir), rouge=rouge, denoiser=dataclasses.asdict(denoiser),
        losses={"pretrain": pre.losses, "finetune": fine.losses, SCRATCH_RUN: scratch.losses},
        predictions=prediction_files,
        model_dirs={"pretrain": pre.model_dir, "finetune": fine.model_dir, SCRATCH_RUN: scratch.model_dir},
        summary_path=os.path.join(results_dir, "summary.json"), test_pairs=len(pairs), controls=controls,
        seconds=round(time.perf_counter() - started, 1))
    with open(result.summary_path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
    return result


def _score_systems(pairs: list[dict], systems: dict[str, list[str]],
                   results_dir: str) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """ROUGE of each system's predictions, and the predictions file written for each under `results_dir`."""
    from bart_jax.decode.files import write_predictions
    from bart_jax.decode.rouge import rouge_scores

    os.makedirs(results_dir, exist_ok=True)
    references = [p["summary"] for p in pairs]
    rouge, prediction_files = {}, {}
    for name, predictions in systems.items():
        rouge[name] = rouge_scores(predictions, references)
        path = os.path.join(results_dir, "predictions." + name.split()[0].replace("+", "_") + ".jsonl")
        write_predictions(path, pairs, predictions)
        prediction_files[name] = path
    return rouge, prediction_files
