"""Tokenizers: SentencePiece training/round trip/special ids, GPT-2 byte-level BPE parity with HF, CLI."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest

from bart_jax.cli.data import cli_tokenizer
from bart_jax.data.tokenizer import Gpt2BpeTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer

FIXTURE_BPE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer_bpe")

_WORDS = ("the of and to in is that for it with as was on be by this are from at or an which "
          "return value function object string list dictionary module class method argument default "
          "number file path name error raise exception iterator generator sequence element index "
          "python interpreter standard library documentation example result option parser").split()


def _corpus(n_lines=400, seed=0):
    """Deterministic pseudo-English lines (a Zipf-ish draw from a fixed word list)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(_WORDS) + 1)
    p /= p.sum()
    lines = []
    for _ in range(n_lines):
        words = rng.choice(_WORDS, size=rng.integers(5, 16), p=p)
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "."]))
    return lines


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    docs = ["\n".join(_corpus(20, seed=i)) for i in range(20)]
    return train_tokenizer(docs, vocab_size=320, out_dir=out), out


def test_special_ids_and_vocab(spm_tok):
    tok, _ = spm_tok
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 320
    assert [tok.id_to_token(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.mark.parametrize("text", [
    "Return the value of the function.",
    "Unicode falls back to bytes: café λ 3.5 😀 日本語",
    "Numbers 1234567 and punctuation!?;:()[]{}",
])
def test_round_trip(spm_tok, text):
    tok, _ = spm_tok
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == f"<s>{text}</s>"
    assert tok.encode(text, add_special_tokens=False) == ids[1:-1]


def test_batch_matches_single(spm_tok):
    tok, _ = spm_tok
    texts = _corpus(10, seed=7) + [""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [tok.encode(t, False) for t in texts]
    ids = tok.encode_batch(texts)
    assert tok.decode_batch(ids) == [tok.decode(i) for i in ids]
    assert tok.decode(np.asarray(ids[0], np.int32)) == texts[0]  # arrays work too


def test_mask_token_in_text(spm_tok):
    tok, _ = spm_tok
    ids = tok.encode("the value <mask> of the list")
    assert ids.count(tok.mask_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == "<s>the value <mask> of the list</s>"
    assert "<mask>" not in tok.decode(ids)


def test_word_start_table(spm_tok):
    tok, _ = spm_tok
    table = tok.word_start_table()
    assert table.dtype == np.bool_ and table.shape == (tok.vocab_size,)
    assert table[[tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id]].all()
    pieces = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    for i, piece in enumerate(pieces[5:], start=5):
        assert table[i] == piece.startswith("\u2581"), piece
    ids = tok.encode("return value", add_special_tokens=False)
    assert table[ids[0]]  # the first piece of a word starts it


def test_sentence_end_ids(spm_tok):
    tok, _ = spm_tok
    ends = tok.sentence_end_ids()
    assert ends and all(set(tok.id_to_token(i).lstrip("\u2581")) <= set(".!?") for i in ends)
    assert tok.encode("Return.", add_special_tokens=False)[-1] in ends


def test_save_load_pickle(spm_tok, tmp_path):
    tok, out = spm_tok
    text = "Return the list of the module."
    for loaded in (load_tokenizer(out), load_tokenizer(os.path.join(out, "tokenizer.model")),
                   pickle.loads(pickle.dumps(tok))):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.encode(text) == tok.encode(text) and loaded.mask_id == tok.mask_id
    tok.save(tmp_path / "copy")
    with open(tmp_path / "copy" / "tokenizer.model", "rb") as a, open(out / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()


def test_training_is_deterministic_and_reads_files(tmp_path):
    lines = _corpus(300, seed=3)
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(lines[:150]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for line in lines[150:]:
            f.write(json.dumps({"text": line}) + "\n")
    a = train_tokenizer([str(txt), str(jsonl)], 340, tmp_path / "a")
    b = train_tokenizer(lines, 340, tmp_path / "b")
    # Same lines -> the same vocabulary (the model bytes differ only in the recorded temp-file paths).
    assert [a.id_to_token(i) for i in range(340)] == [b.id_to_token(i) for i in range(340)]
    assert a.encode_batch(lines) == b.encode_batch(lines)


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "  \n "], 300, tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["text"], 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------- GPT-2 BPE

@pytest.fixture(scope="module")
def bpe_ref():
    with open(os.path.join(FIXTURE_BPE, "reference.json"), encoding="utf-8") as f:
        return json.load(f)


def test_gpt2_matches_hf_bart_tokenizer(bpe_ref):
    tok = load_tokenizer(FIXTURE_BPE)
    assert isinstance(tok, Gpt2BpeTokenizer)
    ids = bpe_ref["special_token_ids"]
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (
        ids["bos"], ids["pad"], ids["eos"], ids["unk"], ids["mask"])
    assert tok.vocab_size == bpe_ref["vocab_size"]
    cases = bpe_ref["cases"]
    assert tok.encode_batch([c["text"] for c in cases]) == [c["input_ids"] for c in cases]
    for case in cases:
        assert tok.encode(case["text"]) == case["input_ids"], case["text"]
        assert tok.decode(case["input_ids"], skip_special_tokens=False) == case["decoded"]
        assert tok.decode(case["input_ids"]) == case["decoded_skip_special"]


def test_gpt2_word_starts_save_pickle(tmp_path):
    tok = load_tokenizer(FIXTURE_BPE)
    table = tok.word_start_table()
    assert table.shape == (tok.vocab_size,) and table[[0, 1, 2, 3, tok.mask_id]].all()
    ids = tok.encode(" world wide", add_special_tokens=False)
    assert table[ids[0]] and tok.id_to_token(ids[0]).startswith("\u0120")
    assert not table[tok.encode("ld", add_special_tokens=False)[0]]
    assert tok.id_to_token(tok.encode(".", add_special_tokens=False)[0]) == "."
    assert tok.encode(".", add_special_tokens=False)[0] in tok.sentence_end_ids()
    tok.save(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(FIXTURE_BPE, name), "rb").read()
    text = "Return the string with <mask> in the middle."
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_gpt2_missing_special_token(tmp_path):
    vocab = json.load(open(os.path.join(FIXTURE_BPE, "vocab.json"), encoding="utf-8"))
    del vocab["<mask>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes(open(os.path.join(FIXTURE_BPE, "merges.txt"), "rb").read())
    with pytest.raises(ValueError, match="<mask>"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------- CLI

def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_corpus(200, seed=5)) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert cli_tokenizer(["train", "--input", str(corpus), "--vocab-size", "340", "--out", str(out)]) == 0
    assert (out / "tokenizer.model").exists()
    capsys.readouterr()
    assert cli_tokenizer(["encode", "--tokenizer", str(out), "the value"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.splitlines()[0].split()]
    assert ids[0] == 0 and ids[-1] == 2
    assert cli_tokenizer(["decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out.strip() == "<s>the value</s>"
