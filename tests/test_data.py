"""Datasets (readers, TFDS builders, built-in corpus) and grain loaders (packing, bucketing, sharding, resume)."""

from __future__ import annotations

import collections
import gzip
import json

import chex
import jax
import numpy as np
import pytest

from bart_jax.cli import main as bart_jax_main
from bart_jax.data import builtin, datasets, loader, multihost
from bart_jax.data.tokenizer import train_tokenizer

BOS, PAD, EOS = 0, 1, 2


class WordTokenizer:
    """Test double with the tokenizer interface: a word 'd<doc>w<j>' is id 10 + 1000 * doc + j (one token),
    a word 'x<k>' is id 10 + k; so every token tells which document it came from."""

    bos_id, pad_id, eos_id, unk_id, mask_id = BOS, PAD, EOS, 3, 4
    vocab_size = 1_000_000

    @staticmethod
    def _id(word):
        word = word.rstrip(".")
        if word.startswith("d"):
            doc, j = word[1:].split("w")
            return 10 + 1000 * int(doc) + int(j)
        return 10 + int(word[1:])

    def encode(self, text, add_special_tokens=True):
        ids = [self._id(w) for w in text.split()]
        return [BOS, *ids, EOS] if add_special_tokens else ids

    def encode_batch(self, texts, add_special_tokens=True):
        return [self.encode(t, add_special_tokens) for t in texts]


def _doc(i, n_words, words_per_sentence=7):
    """Document i: sentences of words d<i>w<j>, j counting up, one sentence per '.'."""
    words = [f"d{i}w{j}" for j in range(n_words)]
    sentences = [" ".join(words[s:s + words_per_sentence]) + "." for s in range(0, n_words, words_per_sentence)]
    return " ".join(sentences)


def _docs(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return [{"text": _doc(i, int(rng.integers(1, 90))).encode()} for i in range(n)]


def _pairs(n=37, seed=0):
    rng = np.random.default_rng(seed)
    return [{"document": " ".join(f"x{k}" for k in range(int(rng.integers(1, 150)))),
             "summary": " ".join(f"x{k}" for k in range(int(rng.integers(1, 40))))} for _ in range(n)]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _all(it):
    return list(it)


# ------------------------------------------------------------------------------------------ readers

def test_text_reader_lines_blank_lines_jsonl_gz(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n   \nsecond doc\n", encoding="utf-8")
    stats = {}
    assert list(datasets.iter_text_documents(str(txt), stats=stats)) == ["first doc", "second doc"]
    assert stats == {"documents": 2, "empty_documents": 2}
    para = tmp_path / "b.txt.gz"
    with gzip.open(para, "wt", encoding="utf-8") as f:
        f.write("line one\nline two\n\n\nnext doc\n")
    assert list(datasets.iter_text_documents(str(para), blank_line_docs=True)) == ["line one\nline two",
                                                                                  "next doc"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"body": "hello"}\n{"body": ""}\n\n{"body": "world"}\n', encoding="utf-8")
    stats = {}
    assert list(datasets.iter_text_documents(str(jsonl), text_field="body", stats=stats)) == ["hello", "world"]
    assert stats["empty_documents"] == 1


def test_reader_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: undecodable bytes"):
        list(datasets.iter_text_documents(str(bad)))
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"document": "d", "summary": "s"}\n{"document": "d", "abstract": "s"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: missing field 'summary'"):
        list(datasets.iter_pairs(str(missing)))
    broken = tmp_path / "j.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"j\.jsonl:2: invalid JSON"):
        list(datasets.iter_text_documents(str(broken)))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("article\thighlights\nsome text\ta summary\n")
    # the header names other columns: said at the header, naming the fields it lacks
    with pytest.raises(ValueError, match=r"p\.tsv:1: the first line of a TSV file is its header row .*"
                                         r"'article\\thighlights', without \['document', 'summary'\]"):
        list(datasets.iter_pairs(str(tsv)))
    assert list(datasets.iter_pairs(str(tsv), document_field="article", summary_field="highlights")) == [
        {"document": "some text", "summary": "a summary"}]


# ------------------------------------------------------------------------------------- TFDS builders

def test_prepare_text_corpus_roundtrip_and_stats(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("alpha beta\n\ngamma delta\nepsilon\n\n", encoding="utf-8")
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "zeta"}\n{"text": "  "}\n', encoding="utf-8")
    ds = datasets.prepare_text_corpus({"train": [train], "validation": str(valid)}, tmp_path / "data",
                                      name="tiny")
    assert {s: len(ds[s]) for s in ds} == {"train": 3, "validation": 1}
    assert sorted(ds["train"][i]["text"] for i in range(3)) == [b"alpha beta", b"epsilon", b"gamma delta"]
    assert ds.stats["train"] == {"documents": 3, "empty_documents": 2}
    assert ds.stats["validation"]["empty_documents"] == 1
    again = datasets.load_prepared(ds.path)  # no builder code needed to read it back
    assert len(again["train"]) == 3 and again.stats == ds.stats
    # Same name, different inputs: refused rather than silently serving stale data.
    train.write_text("other\n", encoding="utf-8")
    with pytest.raises(ValueError, match="other inputs"):
        datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data", name="tiny")


def test_prepare_pairs_and_bad_input(tmp_path):
    rows = [{"doc": f"document {i}", "sum": f"summary {i}"} for i in range(5)] + [{"doc": "", "sum": "x"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    test = tmp_path / "test.tsv"
    test.write_text("doc\tsum\nthe test document\tthe test summary\n", encoding="utf-8")
    ds = datasets.prepare_pairs({"train": [train], "test": [test]}, tmp_path / "data", document_field="doc",
                                summary_field="sum")
    assert len(ds["train"]) == 5 and len(ds["test"]) == 1
    assert ds["test"][0] == {"document": b"the test document", "summary": b"the test summary"}
    assert ds.stats["train"] == {"pairs": 5, "empty_pairs": 1}
    with pytest.raises(ValueError, match=r"train\.jsonl:1: missing field 'summary'"):
        datasets.prepare_pairs({"train": [train]}, tmp_path / "data2", document_field="doc")
    with pytest.raises(FileNotFoundError, match="nope"):
        datasets.prepare_pairs({"train": [tmp_path / "nope.jsonl"]}, tmp_path / "data3")


def test_prepare_holds_out_a_validation_split_from_train(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("".join(f"document {i}\n" for i in range(10)), encoding="utf-8")
    ds = datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data", holdout_every=4)
    texts = {split: sorted(ds[split][i]["text"].decode() for i in range(len(ds[split]))) for split in ds}
    assert texts["validation"] == ["document 0", "document 4", "document 8"]
    assert texts["train"] == [f"document {i}" for i in (1, 2, 3, 5, 6, 7, 9)]
    assert ds.stats["train"]["documents"] == 7 and ds.stats["validation"]["documents"] == 3
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"document": f"d{i}", "summary": f"s{i}"}) + "\n" for i in range(5)))
    ds = datasets.prepare_pairs({"train": [pairs]}, tmp_path / "data", holdout_every=2)
    assert sorted(ds["validation"][i]["summary"] for i in range(3)) == [b"s0", b"s2", b"s4"]
    assert len(ds["train"]) == 2 and ds.stats["validation"]["pairs"] == 3
    with pytest.raises(ValueError, match="choose one"):
        datasets.prepare_pairs({"train": [pairs], "validation": [pairs]}, tmp_path / "d2", holdout_every=2)
    one = tmp_path / "one.txt"
    one.write_text("the only document\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the 1 example\(s\) of .*one.txt all went to the held-out validation"):
        datasets.prepare_text_corpus({"train": [one]}, tmp_path / "d3", holdout_every=100)


def test_cli_builds_text_corpus(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n\n", encoding="utf-8")
    # Train files only: a validation split is held out of them (`run` and training evaluate on it).
    assert bart_jax_main(["data", "text", "--data-dir", str(tmp_path / "d"), "--train", str(corpus)]) == 0
    report = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert report["sizes"] == {"train": 1, "validation": 1}
    assert bart_jax_main(["data", "text", "--data-dir", str(tmp_path / "d"), "--name", "all", "--train",
                          str(corpus), "--holdout-every", "0"]) == 0
    report = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert report["sizes"] == {"train": 2} and report["stats"]["train"]["empty_documents"] == 1
    assert bart_jax_main(["data", "text", "--data-dir", str(tmp_path / "d"), "--name", "both", "--train",
                          str(corpus), "--validation", str(corpus), "--holdout-every", "5"]) == 2
    assert "choose one" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    assert bart_jax_main(["data", "pairs", "--data-dir", str(tmp_path / "d"), "--train", str(bad)]) == 2
    assert "missing field 'document'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- built-in corpus

def _fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    body = " ".join(["This paragraph explains the function in enough words to make a pair."] * 2)
    (root / "alpha.py").write_text(
        f'"""Alpha module docstring.\n\nIt has a body paragraph.\n"""\n\n'
        f'def f():\n    """Compute the alpha value quickly.\n\n    {body}\n\n    >>> f()\n    1\n    """\n\n'
        f'class C:\n    """Shared docstring text."""\n\n    def m(self):\n        """Method doc."""\n')
    (root / "pkg" / "beta.py").write_text('"""Shared docstring text."""\n')  # duplicate of C's docstring
    (root / "test" / "test_x.py").write_text('"""Never harvested: test suites are skipped."""\n')
    (root / "broken.py").write_text("def (:\n")


def test_builtin_harvest_on_fake_stdlib(tmp_path):
    _fake_stdlib(tmp_path)
    corpus = builtin.harvest_stdlib_docs(str(tmp_path))
    all_docs = [d for split in builtin.SPLITS for d in corpus.documents[split]]
    text = "\n".join(all_docs)
    assert "Alpha module docstring." in text and "Method doc." in text
    assert "Never harvested" not in text and ">>>" not in text
    assert text.count("Shared docstring text.") == 1  # de-duplicated
    assert corpus.stats["files_unparsable"] == 1 and corpus.stats["duplicate_docstrings"] == 1
    pairs = [p for split in builtin.SPLITS for p in corpus.pairs[split]]
    assert pairs == [{"document": " ".join(["This paragraph explains the function in enough words to make "
                                            "a pair."] * 2), "summary": "Compute the alpha value quickly."}]
    assert builtin.harvest_stdlib_docs(str(tmp_path)) == corpus  # deterministic


def test_builtin_corpus_splits_are_disjoint():
    docs, pairs = builtin.builtin_documents(), builtin.builtin_pairs()
    assert set(docs) == set(pairs) == set(builtin.SPLITS)
    assert all(len(pairs[s]) > 50 and len(docs[s]) > 10 for s in builtin.SPLITS)
    assert len(pairs["train"]) > 5 * len(pairs["test"])
    seen = {}
    for split in builtin.SPLITS:
        for p in pairs[split]:
            assert p["document"].strip() and p["summary"].strip() and "\n" not in p["summary"]
            assert seen.setdefault(p["document"], split) == split
    # No held-out summary or body paragraph is pretraining training text.
    train_paragraphs = set("\n".join(docs["train"]).splitlines())
    held_out = pairs["validation"] + pairs["test"]
    assert not any(p["summary"] in train_paragraphs or p["document"] in train_paragraphs for p in held_out)


# ---------------------------------------------------------------------------------------------- packing

def test_pack_document_respects_sentences_and_length():
    sentences = [[5] * 3, [6] * 4, [7] * 2, [8] * 13, [9] * 1]
    rows = loader.pack_document(sentences, seq_len=10, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    chex.assert_shape(rows, (4, 10))
    assert rows.dtype == np.int32
    contents = [r[1:list(r).index(EOS)].tolist() for r in rows]
    # capacity 8: whole sentences [3+4] and [2]; the 13-token sentence alone is cut (8 + 5), and the next
    # sentence joins its remainder.
    assert contents == [[5] * 3 + [6] * 4, [7] * 2, [8] * 8, [8] * 5 + [9]]
    assert (rows[:, 0] == BOS).all() and (rows[1, 4:] == PAD).all()
    assert loader.pack_document([], 10, BOS, EOS, PAD).shape == (0, 10)


def _row_docs(tokens):
    """For each non-empty row: (doc id, token ids) checking the row format `<s> ... </s> pad...`."""
    out = []
    for row in tokens:
        if (row == PAD).all():
            continue
        end = list(row).index(EOS)
        assert row[0] == BOS and (row[end + 1:] == PAD).all()
        ids = row[1:end]
        docs = set(((ids - 10) // 1000).tolist())
        assert len(docs) == 1, f"row mixes documents {docs}"
        out.append((docs.pop(), ids.tolist()))
    return out


def test_pretrain_blocks_never_cross_documents_and_cover_epoch():
    docs = _docs(23)
    it = loader.pretrain_batches(docs, WordTokenizer(), seq_len=16, batch_size=4, seed=1, num_epochs=1,
                                 process_index=0, process_count=1)
    batches = _all(it)
    chex.assert_shape(batches[0]["tokens"], (4, 16))
    rows = [r for b in batches for r in _row_docs(b["tokens"])]
    by_doc = collections.defaultdict(list)
    for doc, ids in rows:
        by_doc[doc].extend(ids)
    tok = WordTokenizer()
    for i, d in enumerate(docs):  # every document exactly once, in order, split only across its own rows
        assert by_doc[i] == tok.encode(d["text"].decode(), add_special_tokens=False)


def test_pretrain_two_processes_cover_each_document_once():
    docs, tok = _docs(23), WordTokenizer()
    seen = collections.Counter()
    for p in range(2):
        it = loader.pretrain_batches(docs, tok, seq_len=16, batch_size=4, seed=5, num_epochs=1,
                                     process_index=p, process_count=2)
        for doc, ids in (r for b in it for r in _row_docs(b["tokens"])):
            assert doc % 2 == p  # each process reads only its shard
            seen[doc] += len(ids)
    assert seen == {i: len(tok.encode(d["text"].decode(), False)) for i, d in enumerate(docs)}


def test_pretrain_deterministic_reshuffled_and_worker_independent():
    docs, tok = _docs(23), WordTokenizer()
    kw = dict(seq_len=16, batch_size=4, process_index=0, process_count=1)
    a = _take(loader.pretrain_batches(docs, tok, seed=3, read_threads=1, **kw), 12)
    b = _take(loader.pretrain_batches(docs, tok, seed=3, read_threads=4, **kw), 12)
    c = _take(loader.pretrain_batches(docs, tok, seed=4, **kw), 12)
    chex.assert_trees_all_equal(a, b)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # Two epochs: the second is a different permutation of the same documents.
    order = [doc for bt in loader.pretrain_batches(docs, tok, seed=3, num_epochs=2, **kw)
             for doc, _ in _row_docs(bt["tokens"])]
    firsts = [d for i, d in enumerate(order) if i == 0 or order[i - 1] != d]
    assert sorted(firsts[:23]) == sorted(firsts[23:]) == list(range(23)) and firsts[:23] != firsts[23:]


@pytest.mark.integration
def test_pretrain_same_output_with_worker_processes():
    docs, tok = _docs(23), WordTokenizer()
    kw = dict(seq_len=16, batch_size=4, seed=2, process_index=0, process_count=1)
    a = _take(loader.pretrain_batches(docs, tok, **kw), 10)
    it = loader.pretrain_batches(docs, tok, num_workers=2, **kw)
    b = _take(it, 10)
    chex.assert_trees_all_equal(a, b)


def test_pretrain_resume_gives_same_next_batch():
    docs, tok = _docs(23), WordTokenizer()
    kw = dict(seq_len=16, batch_size=3, seed=7, process_index=1, process_count=2)
    it = loader.pretrain_batches(docs, tok, **kw)
    for n in (1, 9, 17):  # inside a document, and across the epoch boundary
        _take(it, n)
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
        expected = _take(it, 3)
        fresh = loader.pretrain_batches(docs, tok, **kw)
        fresh.set_state(state)
        chex.assert_trees_all_equal(_take(fresh, 3), expected)


# ------------------------------------------------------------------------------------------- fine-tuning

def _check_model_batch(batch, batch_size):
    for key in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"):
        assert batch[key].dtype == np.int32 and batch[key].shape[0] == batch_size
    np.testing.assert_array_equal(batch["attention_mask"], batch["input_ids"] != PAD)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], EOS)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    np.testing.assert_array_equal(batch["decoder_attention_mask"], batch["decoder_input_ids"] != PAD)
    assert (batch["input_ids"][:, 0] == BOS).all()


def test_finetune_two_processes_cover_each_pair_once_and_truncate():
    pairs, tok = _pairs(37), WordTokenizer()
    seen, n_batches = collections.Counter(), []
    for p in range(2):
        it = loader.finetune_batches(pairs, tok, max_source_len=64, max_target_len=16, batch_size=4, seed=0,
                                     num_epochs=1, return_example_ids=True, process_index=p, process_count=2)
        batches = _all(it)
        n_batches.append(len(batches))
        for b in batches:
            _check_model_batch(b, 4)
            for row, i in enumerate(b["example_id"]):
                if i < 0:
                    assert (b["labels"][row] == PAD).all()  # padding rows carry no loss
                    continue
                seen[int(i)] += 1
                src = tok.encode(pairs[i]["document"])
                src = src if len(src) <= 64 else src[:63] + [EOS]
                got = b["input_ids"][row][b["input_ids"][row] != PAD].tolist()
                assert got == src
                tgt = tok.encode(pairs[i]["summary"])
                tgt = tgt if len(tgt) <= 16 else tgt[:15] + [EOS]
                assert b["labels"][row][b["labels"][row] != PAD].tolist() == tgt
    assert seen == {i: 1 for i in range(37)}
    assert n_batches[0] == n_batches[1]  # equal counts: no process waits in a collective


@pytest.mark.parametrize("bucket", [True, False])
def test_finetune_decoder_starts_with_the_models_decoder_start_id(bucket):
    """decoder_input_ids are shift_tokens_right(labels) from the model's decoder_start_token_id (mBART-style
    models start elsewhere than </s>); without one, BART's </s>."""
    pairs, tok = _pairs(8), WordTokenizer()
    kw = dict(max_source_len=32, max_target_len=8, batch_size=4, seed=0, num_epochs=1, bucket=bucket,
              process_index=0, process_count=1)
    for start, want in ((None, EOS), (7, 7)):
        for b in _all(loader.finetune_batches(pairs, tok, decoder_start_id=start, **kw)):
            np.testing.assert_array_equal(b["decoder_input_ids"][:, 0], want)
            np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])


def test_finetune_bucketing_cuts_padding():
    pairs, tok = _pairs(64, seed=1), WordTokenizer()
    kw = dict(max_source_len=128, max_target_len=32, batch_size=4, seed=0, num_epochs=1, process_index=0,
              process_count=1)
    bucketed = _all(loader.finetune_batches(pairs, tok, bucket_window=8, **kw))
    plain = _all(loader.finetune_batches(pairs, tok, bucket=False, **kw))
    bounds = loader.bucket_boundaries(128)
    assert bounds == (32, 64, 128)
    for b in bucketed:
        _check_model_batch(b, 4)
        width = b["input_ids"].shape[1]
        assert width in bounds and b["labels"].shape[1] in loader.bucket_boundaries(32)
        longest = b["attention_mask"].sum(1).max()
        assert width == min(x for x in bounds if x >= longest)  # the smallest bucket that fits
    assert all(b["input_ids"].shape == (4, 128) for b in plain)

    def padding(batches):
        return sum((b["input_ids"] == PAD).sum() for b in batches) / sum(b["input_ids"].size for b in batches)

    assert padding(bucketed) < 0.8 * padding(plain)
    assert sum(b["attention_mask"].sum() for b in bucketed) == sum(b["attention_mask"].sum() for b in plain)


def test_text_helpers_as_text_and_padded_length():
    """One bytes-to-str helper for every TFDS value shape, and one bucketing rule for loaders and decoding."""
    from bart_jax.data.text import as_text, bucket_boundaries, padded_length

    for value in (b"caf\xc3\xa9", np.bytes_(b"caf\xc3\xa9"), np.array(b"caf\xc3\xa9"),
                  np.array(b"caf\xc3\xa9", dtype=object), "café", np.str_("café")):
        assert as_text(value) == "café", value
    assert [padded_length(n, bucket_boundaries(64, 16)) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert bucket_boundaries(8, 16) == (8,)
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        padded_length(65, bucket_boundaries(64))


def test_finetune_resume_and_determinism():
    pairs, tok = _pairs(37), WordTokenizer()
    kw = dict(max_source_len=64, max_target_len=16, batch_size=4, seed=11, bucket_window=3,
              return_example_ids=True, process_index=0, process_count=1)
    it = loader.finetune_batches(pairs, tok, **kw)
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    again = loader.finetune_batches(pairs, tok, **kw)
    chex.assert_trees_all_equal(_take(again, 5), first)
    fresh = loader.finetune_batches(pairs, tok, **kw)
    fresh.set_state(state)
    chex.assert_trees_all_equal(_take(fresh, 4), expected)


# ------------------------------------------------------------------------------------ end to end + jax

def test_prepared_builtin_pairs_with_trained_tokenizer(tmp_path):
    ds = datasets.prepare_builtin(tmp_path / "data", "pairs")
    assert {s: len(ds[s]) for s in ds} == {s: len(builtin.builtin_pairs()[s]) for s in builtin.SPLITS}
    docs = [p["document"] for p in builtin.builtin_pairs()["train"][:300]]
    tok = train_tokenizer(docs, 400, tmp_path / "tok")
    batch = next(loader.finetune_batches(ds["validation"], tok, max_source_len=64, max_target_len=32,
                                         batch_size=4, seed=0, return_example_ids=True, process_index=0,
                                         process_count=1))
    _check_model_batch(batch, 4)
    for row, i in enumerate(batch["example_id"]):
        summary = ds["validation"][int(i)]["summary"].decode()
        ids = tok.encode(summary)
        ids = ids if len(ids) <= 32 else ids[:31] + [tok.eos_id]
        assert batch["labels"][row][batch["labels"][row] != tok.pad_id].tolist() == ids


def test_to_global_batch_shards_over_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    local = {"tokens": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
             "example_id": np.arange(8, dtype=np.int32)}
    out = multihost.to_global_batch(local, sharding)
    assert isinstance(out["tokens"], jax.Array) and out["tokens"].shape == (8, 6)
    assert out["tokens"].sharding.is_equivalent_to(sharding, 2)
    assert len(out["tokens"].addressable_shards) == 8
    chex.assert_trees_all_equal(jax.device_get(out), local)


def test_prepare_refuses_input_edited_in_place_with_same_size(tmp_path):
    """Reuse is by content: the same file name and byte count with other bytes is another dataset."""
    train = tmp_path / "train.txt"
    train.write_text("alpha beta\ngamma\n", encoding="utf-8")
    ds = datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data")
    assert sorted(ds["train"][i]["text"] for i in range(2)) == [b"alpha beta", b"gamma"]
    before = train.stat().st_size
    train.write_text("alpha BETA\ngamma\n", encoding="utf-8")
    assert train.stat().st_size == before
    with pytest.raises(ValueError, match="other inputs"):
        datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data")
    ds = datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data", overwrite=True)
    assert sorted(ds["train"][i]["text"] for i in range(2)) == [b"alpha BETA", b"gamma"]
    # Same bytes again: reused without complaint.
    assert len(datasets.prepare_text_corpus({"train": [train]}, tmp_path / "data")["train"]) == 2


def test_file_sha256_streams_in_chunks(tmp_path, monkeypatch):
    import hashlib

    blob = bytes(range(256)) * 20
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    monkeypatch.setattr(datasets, "_HASH_CHUNK", 1000)  # several reads, a partial last one
    assert datasets.file_sha256(path) == hashlib.sha256(blob).hexdigest()
