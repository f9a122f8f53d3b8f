"""A model and its tokenizer travel together, and a checkpoint knows what it was trained on: a fine-tune from a
model uses the model's tokenizer (another one named in data.tokenizer is an error naming both), and a resume on
a dataset rebuilt from other inputs under the same path is refused."""

from __future__ import annotations

import os
import shutil

import pytest

from bart_jax.cli import main
from bart_jax.train import config as C
from bart_jax.train import loop
from bart_jax.train.provenance import stage_tokenizer
from toy_batches import SMALL_MODEL_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
VOCAB = 300


def _corpus_dataset(tmp_path, word: str):
    from bart_jax.data import datasets

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"the {word} fox number {i} jumps over the lazy dog {7 * i}. another one here."
                              for i in range(200)), encoding="utf-8")
    return datasets.prepare_text_corpus({"train": [path]}, tmp_path / "data", name="c", overwrite=True).path


def _spm_tokenizer(tmp_path, name: str, word: str):
    from bart_jax.data import train_tokenizer

    train_tokenizer([f"a {word} text number {i} with words." for i in range(300)], VOCAB, tmp_path / name)
    return str(tmp_path / name)


def _hf_model_with_tokenizer(directory):
    os.makedirs(directory)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURES, "bart_default", name), directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(FIXTURES, "tokenizer_bpe", name), directory)
    return str(directory)


def test_finetune_from_a_model_directory_uses_its_tokenizer(tmp_path):
    from bart_jax.data import load_tokenizer

    model = _hf_model_with_tokenizer(tmp_path / "hf")
    cfg = C.load_config("tiny", [f"workdir={tmp_path / 'run'}", f"finetune.init_from={model}"])
    tok, directory = stage_tokenizer(cfg, "finetune")
    assert directory == model and tok.fingerprint == load_tokenizer(model).fingerprint
    assert not os.path.exists(tmp_path / "run" / "tokenizer")  # nothing trained beside it

    # The same tokenizer named explicitly is fine; another one is refused, naming both.
    same = C.load_config("tiny", [f"workdir={tmp_path / 'run'}", f"finetune.init_from={model}",
                                  f"data.tokenizer={model}"])
    assert stage_tokenizer(same, "finetune")[0].fingerprint == tok.fingerprint
    other = _spm_tokenizer(tmp_path, "spm", "quick")
    argv = ["finetune", "--config", "tiny", f"workdir={tmp_path / 'run'}", f"finetune.init_from={model}",
            f"data.tokenizer={other}"]
    assert main(argv) == 2


def test_fingerprints_follow_content_not_path(tmp_path):
    from bart_jax.data import load_tokenizer

    a = _spm_tokenizer(tmp_path, "a", "quick")
    shutil.copytree(a, tmp_path / "copy")
    b = _spm_tokenizer(tmp_path, "b", "slow")
    assert load_tokenizer(a).fingerprint == load_tokenizer(tmp_path / "copy").fingerprint
    assert load_tokenizer(a).fingerprint != load_tokenizer(b).fingerprint
    bpe = load_tokenizer(os.path.join(FIXTURES, "tokenizer_bpe"))
    assert bpe.fingerprint.startswith("bpe:") and load_tokenizer(a).fingerprint.startswith("spm:")


@pytest.mark.integration
def test_checkpoint_records_its_inputs_and_resume_and_finetune_check_them(tmp_path, capsys):
    """One 2-step pretraining run; then every refusal comes before any compilation."""
    source = _corpus_dataset(tmp_path, "quick")
    tok_dir = _spm_tokenizer(tmp_path, "tok", "quick")
    args = [f"workdir={tmp_path / 'run'}", f"data.pretrain_source={source}", f"data.tokenizer={tok_dir}",
            *SMALL_MODEL_OVERRIDES, "pretrain.train.steps=2", "pretrain.train.batch_size=8",
            "pretrain.train.source_length=32", "pretrain.train.eval_every=0", "pretrain.train.checkpoint_every=1",
            "pretrain.train.progress_bar=false", "checkpoint.async_save=false"]
    assert loop.pretrain(C.load_config("tiny", args)).final_step == 2

    from bart_jax.train.checkpoint import read_checkpoint_config

    stored = read_checkpoint_config(tmp_path / "run" / "pretrain" / "checkpoints")
    from bart_jax.data import load_prepared, load_tokenizer

    assert stored["inputs"] == {"tokenizer": load_tokenizer(tok_dir).fingerprint,
                                "dataset": load_prepared(source).fingerprint}

    # Resuming with another tokenizer: refused, naming both.
    other = _spm_tokenizer(tmp_path, "other", "slow")
    assert main(["pretrain", "--config", "tiny", *args, f"data.tokenizer={other}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"trained with tokenizer {load_tokenizer(tok_dir).fingerprint}" in err
    assert load_tokenizer(other).fingerprint in err

    # Fine-tuning from that checkpoint with another tokenizer: the same refusal.
    assert main(["finetune", "--config", "tiny", f"workdir={tmp_path / 'run'}", "finetune.init_from=run:pretrain",
                 f"data.tokenizer={other}", *SMALL_MODEL_OVERRIDES[1:]]) == 2
    assert "a model and its tokenizer go together" in capsys.readouterr().err

    # The dataset rebuilt from other text under the same path: the resume is refused, ...
    assert _corpus_dataset(tmp_path, "slow") == source
    assert main(["pretrain", "--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert "was rebuilt from other inputs" in err and err.count("bart-jax pretrain: error:") == 1
    # ... unless asked for (then it trains on to step 4).
    result = loop.pretrain(C.load_config("tiny", [*args, "pretrain.train.steps=4"]), allow_config_change=True)
    assert result.final_step == 4
