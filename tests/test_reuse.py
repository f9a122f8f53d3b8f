"""Nothing stale is reused silently: a workdir tokenizer records what it was trained from, and a resume
whose training settings differ from the checkpoint's is refused unless asked for."""

from __future__ import annotations

import json
import os

import pytest

from bart_jax.train import config as C
from bart_jax.train import loop

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
    tok, directory = loop.load_or_train_tokenizer(_cfg(workdir, source))
    with open(os.path.join(directory, loop.TOKENIZER_PROVENANCE_FILE)) as f:
        stored = json.load(f)
    assert stored["pretrain_source"] == os.path.abspath(source) and stored["tokenizer_vocab_size"] == VOCAB
    model_bytes = open(os.path.join(directory, "tokenizer.model"), "rb").read()
    # Same settings: reused as is.
    again, _ = loop.load_or_train_tokenizer(_cfg(workdir, source))
    assert again.vocab_size == tok.vocab_size

    # Another vocabulary size: an error naming both values, and the tokenizer is left alone.
    with pytest.raises(ValueError, match=r"data\.tokenizer_vocab_size=300.*data\.tokenizer_vocab_size=320"):
        loop.load_or_train_tokenizer(_cfg(workdir, source, 320))
    # Another source: named both ways too.
    other = corpus_dataset("b", word="slow")
    with pytest.raises(ValueError, match=f"data.pretrain_source='{os.path.abspath(source)}'.*"
                                         f"data.pretrain_source='{os.path.abspath(other)}'"):
        loop.load_or_train_tokenizer(_cfg(workdir, other))
    # The same dataset directory rebuilt from other text: another content fingerprint.
    corpus_dataset("a", word="slow")
    with pytest.raises(ValueError, match="content fingerprint"):
        loop.load_or_train_tokenizer(_cfg(workdir, source))
    assert open(os.path.join(directory, "tokenizer.model"), "rb").read() == model_bytes
    # Asking for that tokenizer explicitly is always allowed.
    explicit, where = loop.load_or_train_tokenizer(_cfg(workdir, other, 320, f"data.tokenizer={directory}"))
    assert where == directory and explicit.vocab_size == tok.vocab_size
