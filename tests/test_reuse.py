"""Nothing stale is reused silently: a workdir tokenizer records what it was trained from, and a resume
whose training settings differ from the checkpoint's is refused unless asked for."""

from __future__ import annotations

import json
import os

import pytest

from bart_jax.cli import train as cli_train
from bart_jax.train import config as C
from bart_jax.train import inputs, loop, resume

VOCAB = 300  # the smallest SentencePiece vocabulary that trains in a blink on the corpus below


def _corpus(path, word: str):
    path.write_text("\n".join(f"the {word} fox number {i} jumps over the lazy dog {7 * i}. another one here."
                              for i in range(200)), encoding="utf-8")
    return path


@pytest.fixture()
def corpus_dataset(tmp_path):
    from bart_jax.data import datasets

    def make(name: str, word: str = "quick"):
        path = _corpus(tmp_path / f"{name}.txt", word)
        return datasets.prepare_text_corpus({"train": [path]}, tmp_path / "data", name=name, overwrite=True).path

    return make


def _cfg(workdir, source, vocab=VOCAB, *extra):
    return C.load_config("tiny", [f"workdir={workdir}", f"data.pretrain_source={source}",
                                  f"data.tokenizer_vocab_size={vocab}", *extra])


def test_workdir_tokenizer_records_what_it_was_trained_from(tmp_path, corpus_dataset):
    source = corpus_dataset("a")
    workdir = tmp_path / "run"
    tok, directory = inputs.load_or_train_tokenizer(_cfg(workdir, source))
    with open(os.path.join(directory, inputs.TOKENIZER_PROVENANCE_FILE)) as f:
        stored = json.load(f)
    assert stored["pretrain_source"] == os.path.abspath(source) and stored["tokenizer_vocab_size"] == VOCAB
    model_bytes = open(os.path.join(directory, "tokenizer.model"), "rb").read()
    # Same settings: reused as is.
    again, _ = inputs.load_or_train_tokenizer(_cfg(workdir, source))
    assert again.vocab_size == tok.vocab_size

    # Another vocabulary size: an error naming both values, and the tokenizer is left alone.
    with pytest.raises(ValueError, match=r"data\.tokenizer_vocab_size=300.*data\.tokenizer_vocab_size=320"):
        inputs.load_or_train_tokenizer(_cfg(workdir, source, 320))
    # Another source: named both ways too.
    other = corpus_dataset("b", word="slow")
    with pytest.raises(ValueError, match=f"data.pretrain_source='{os.path.abspath(source)}'.*"
                                         f"data.pretrain_source='{os.path.abspath(other)}'"):
        inputs.load_or_train_tokenizer(_cfg(workdir, other))
    # The same dataset directory rebuilt from other text: another content fingerprint.
    corpus_dataset("a", word="slow")
    with pytest.raises(ValueError, match="content fingerprint"):
        inputs.load_or_train_tokenizer(_cfg(workdir, source))
    assert open(os.path.join(directory, "tokenizer.model"), "rb").read() == model_bytes
    # Asking for that tokenizer explicitly is always allowed.
    explicit, where = inputs.load_or_train_tokenizer(_cfg(workdir, other, 320, f"data.tokenizer={directory}"))
    assert where == directory and explicit.vocab_size == tok.vocab_size


# ------------------------------------------------------------------------------------------ resume
@pytest.fixture()
def small_run(tmp_path, corpus_dataset):
    """Arguments of a 2-step tiny pretraining run on a small corpus, and the run after it finished."""
    source = corpus_dataset("a")
    tok_dir = tmp_path / "tok"
    from bart_jax.data import load_prepared, train_tokenizer

    ds = load_prepared(source)["train"]
    train_tokenizer([bytes(ds[i]["text"]).decode() for i in range(len(ds))], VOCAB, tok_dir)
    args = [f"workdir={tmp_path / 'run'}", f"data.pretrain_source={source}", f"data.tokenizer={tok_dir}",
            "model.vocab_size=512", "pretrain.train.steps=2", "pretrain.train.batch_size=8",
            "pretrain.train.source_length=32", "pretrain.train.eval_every=0", "pretrain.train.checkpoint_every=1",
            "pretrain.train.progress_bar=false", "pretrain.train.peak_flops_per_device=1e9",
            "checkpoint.async_save=false"]
    first = loop.pretrain(C.load_config("tiny", args))
    assert first.final_step == 2
    return args, first


def _latest(checkpoint_dir):
    from bart_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(checkpoint_dir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


@pytest.mark.integration
def test_resume_with_changed_training_settings_is_refused_unless_allowed(small_run, caplog):
    args, first = small_run
    longer = C.load_config("tiny", args + ["pretrain.train.steps=4", "pretrain.optimizer.learning_rate=0.5"])
    lr = C.load_config("tiny").pretrain.optimizer.learning_rate
    with pytest.raises(ValueError, match=rf"pretrain\.optimizer\.learning_rate: {lr} -> 0\.5; "
                                         r"pretrain\.train\.steps: 2 -> 4.*--allow-config-change"):
        loop.pretrain(longer)
    assert _latest(first.checkpoint_dir) == 2  # nothing trained, nothing written

    # (That cadence/logging/mesh changes are not refused: test_resume_config_changes_lists_only_trajectory_settings.)
    with caplog.at_level("WARNING", logger="bart_jax.train.resume"):
        resumed = loop.pretrain(C.load_config("tiny", args + ["pretrain.train.steps=4"]), allow_config_change=True)
    assert resumed.resumed_from == 2 and resumed.final_step == 4 and len(resumed.losses) == 2
    assert "pretrain.train.steps: 2 -> 4" in caplog.text


def test_resume_config_changes_lists_only_trajectory_settings():
    cfg = C.load_config("tiny")
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert resume.resume_config_changes(stored, cfg, "pretrain") == []
    changed = C.apply_overrides(cfg, ["pretrain.schedule.warmup_steps=7", "pretrain.train.batch_size=24",
                                      "pretrain.train.eval_every=3", "mesh.fsdp=2", "noise.mask_ratio=0.5",
                                      "finetune.train.steps=9"])
    assert resume.resume_config_changes(stored, changed, "pretrain") == [
        ("pretrain.schedule.warmup_steps", cfg.pretrain.schedule.warmup_steps, 7),
        ("pretrain.train.batch_size", cfg.pretrain.train.batch_size, 24), ("noise.mask_ratio", None, 0.5)]
    assert [k for k, _, _ in resume.resume_config_changes(stored, changed, "finetune")] == ["finetune.train.steps"]
    del stored["pretrain"]["train"]["steps"]  # written by an older version: not compared
    assert "pretrain.train.steps" not in [k for k, _, _ in resume.resume_config_changes(
        stored, C.apply_overrides(cfg, ["pretrain.train.steps=3"]), "pretrain")]


def test_allow_config_change_flag_reaches_the_training_functions(monkeypatch):
    from bart_jax.cli import run as run_cli

    seen = []
    monkeypatch.setattr(cli_train, "run_stage", lambda cfg, stage, **kw: seen.append((stage, kw)) or _Done())
    assert cli_train.cli_pretrain(["--config", "tiny", "--allow-config-change"]) == 0
    assert cli_train.cli_finetune(["--config", "tiny"]) == 0
    assert [(stage, kw["allow_config_change"]) for stage, kw in seen] == [("pretrain", True), ("finetune", False)]
    # and the CLI's stages print their resume/step lines through its reporter
    assert all(isinstance(kw["reporter"], cli_train.PrintedStageReporter) for _, kw in seen)
    calls = []
    monkeypatch.setattr(run_cli, "run_and_print", lambda *a, **kw: calls.append(kw))
    assert run_cli.cli_run(["--allow-config-change", "--quick"]) == 0
    assert calls[0]["allow_config_change"] is True


class _Done:
    final_step, losses, eval_metrics, checkpoint_dir, best_step, model_dir = 0, [], {}, "", None, None
