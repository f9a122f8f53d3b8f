"""User errors end in one line `bart-jax <command>: error: ...` and exit code 2, before any expensive work and
without touching what the user had; Ctrl-C / SIGTERM save a checkpoint and exit 130 / 143; a run directory
is locked against a second process; model-directory writes are atomic."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from bart_jax.cli import main
from toy_batches import SMALL_MODEL_OVERRIDES
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _copy_model(dst):
    """A Hugging Face model directory: the fixture's config and weights (not its reference arrays)."""
    os.makedirs(dst)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURES, "bart_default", name), os.path.join(dst, name))


def _snapshot(root) -> dict[str, bytes]:
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _assert_one_line_error(capsys, command: str, message: str):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("bart-jax")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bart-jax {command}: error: "), err
    assert re.search(message, lines[0]), lines[0]


# ------------------------------------------------------------------------------- rows: the input they need
def _workdir(tmp):
    return str(tmp / "run")


def _setup_row(name, tmp):
    """Create what a row needs under `tmp`; return its argv."""
    w = f"workdir={_workdir(tmp)}"
    if name == "noise_preset":
        return ["pretrain", w, "noise.preset=nosuch"]
    if name == "model_preset":
        return ["pretrain", w, "model.preset=nosuch"]
    if name == "model_dtype":
        return ["pretrain", w, "model.dtype=float17"]
    if name == "length_vs_positions":
        return ["pretrain", w, "pretrain.train.source_length=4096"]
    if name == "finetune_target_length":
        return ["finetune", "--config", TINY, w, "finetune.train.target_length=4096"]
    if name == "mesh_vs_devices":
        return ["pretrain", w, "mesh.fsdp=3"]
    if name == "run_bad_noise":
        return ["run", "--workdir", _workdir(tmp), "noise.preset=nosuch"]
    if name == "run_pairs_without_test":
        from bart_jax.data import datasets

        (tmp / "t.txt").write_text("".join(f"document number {i}.\n" for i in range(4)))
        (tmp / "p.jsonl").write_text("".join(json.dumps({"document": f"d {i}", "summary": "s"}) + "\n"
                                             for i in range(4)))
        text = datasets.prepare_text_corpus({"train": [tmp / "t.txt"]}, tmp / "d", holdout_every=2)
        pairs = datasets.prepare_pairs({"train": [tmp / "p.jsonl"]}, tmp / "d", holdout_every=2)
        return ["run", "--workdir", _workdir(tmp), f"data.pretrain_source={text.path}",
                f"data.finetune_source={pairs.path}"]
    if name == "finetune_without_pretrain":
        return ["finetune", w]
    if name == "workdir_under_file":
        (tmp / "afile").write_text("mine")
        return ["pretrain", f"workdir={tmp / 'afile' / 'run'}"]
    if name == "convert_empty_dir":
        (tmp / "empty").mkdir()
        return ["convert", str(tmp / "empty"), str(tmp / "out")]
    if name == "convert_truncated_safetensors":
        shutil.copytree(os.path.join(FIXTURES, "bart_default"), tmp / "trunc")
        data = (tmp / "trunc" / "model.safetensors").read_bytes()
        (tmp / "trunc" / "model.safetensors").write_bytes(data[:1000])
        return ["convert", str(tmp / "trunc"), str(tmp / "out")]
    if name == "convert_gpt2_config":
        (tmp / "gpt2").mkdir()
        (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
        return ["convert", str(tmp / "gpt2"), str(tmp / "out")]
    if name == "convert_missing_path":
        return ["convert", str(tmp / "nowhere"), str(tmp / "out")]
    if name == "convert_random_model_pt":
        (tmp / "model.pt").write_bytes(random.Random(0).randbytes(2000))
        return ["convert", str(tmp / "model.pt"), str(tmp / "out")]
    if name == "convert_into_nonempty_dir":
        (tmp / "out" / "runs" / "a").mkdir(parents=True)
        (tmp / "out" / "runs" / "a" / "notes.txt").write_text("precious")
        return ["convert", os.path.join(FIXTURES, "bart_default"), str(tmp / "out")]
    if name == "convert_over_model_without_overwrite":
        _copy_model(tmp / "out")
        return ["convert", os.path.join(FIXTURES, "fairseq_bart", "model.pt"), str(tmp / "out")]
    if name == "convert_overwrite_user_folder":  # a project folder that happens to have a config.json
        (tmp / "proj").mkdir()
        (tmp / "proj" / "config.json").write_text(json.dumps({"theme": "dark"}))
        (tmp / "proj" / "notes.txt").write_text("precious")
        return ["convert", os.path.join(FIXTURES, "bart_default"), str(tmp / "proj"), "--overwrite"]
    if name == "convert_overwrite_model_with_user_file":  # a model folder the user also keeps other files in
        _copy_model(tmp / "m")
        (tmp / "m" / "results.csv").write_text("precious")
        return ["convert", os.path.join(FIXTURES, "fairseq_bart", "model.pt"), str(tmp / "m"), "--overwrite"]
    if name == "convert_onto_itself":
        shutil.copytree(os.path.join(FIXTURES, "bart_default"), tmp / "m")
        (tmp / "m" / "tokenizer.model").write_bytes(b"sp")
        return ["convert", str(tmp / "m"), str(tmp / "m"), "--overwrite"]
    if name == "data_text_empty_file":
        (tmp / "empty.txt").write_text("")
        return ["data", "text", "--data-dir", str(tmp / "d"), "--train", str(tmp / "empty.txt")]
    if name == "data_pairs_all_empty":
        (tmp / "p.jsonl").write_text("".join(json.dumps({"document": d, "summary": s}) + "\n"
                                             for d, s in (("", "x"), ("doc", " "), ("", ""))))
        return ["data", "pairs", "--data-dir", str(tmp / "d"), "--train", str(tmp / "p.jsonl")]
    if name == "tokenizer_empty_file":
        (tmp / "empty.txt").write_text("")
        return ["tokenizer", "train", "--input", str(tmp / "empty.txt"), "--out", str(tmp / "tok"),
                "--vocab-size", "300"]
    if name == "tokenizer_latin1_file":
        (tmp / "latin.txt").write_bytes("café au lait\n".encode("latin-1"))
        return ["tokenizer", "train", "--input", str(tmp / "latin.txt"), "--out", str(tmp / "tok"),
                "--vocab-size", "300"]
    if name == "generate_negative_source_length":
        return ["generate", "--checkpoint", os.path.join(FIXTURES, "bart_default"), "--tokenizer",
                os.path.join(FIXTURES, "tokenizer_bpe"), "--max-source-length", "-5"]
    if name == "generate_output_under_file":
        (tmp / "afile").write_text("mine")
        (tmp / "docs.txt").write_text("a document\n")
        return ["generate", "--checkpoint", os.path.join(FIXTURES, "bart_default"), "--input",
                str(tmp / "docs.txt"), "--output", str(tmp / "afile" / "out.txt")]
    if name == "evaluate_output_dir_under_file":
        (tmp / "afile").write_text("mine")
        (tmp / "p.jsonl").write_text(json.dumps({"document": "a b", "summary": "a"}) + "\n")
        return ["evaluate", "--checkpoint", os.path.join(FIXTURES, "bart_default"), "--data",
                str(tmp / "p.jsonl"), "--output-dir", str(tmp / "afile" / "eval")]
    if name == "tokenizer_out_under_file":
        (tmp / "afile").write_text("mine")
        (tmp / "c.txt").write_text("some text\n")
        return ["tokenizer", "train", "--input", str(tmp / "c.txt"), "--out", str(tmp / "afile" / "tok")]
    if name == "data_dir_under_file":
        (tmp / "afile").write_text("mine")
        (tmp / "c.txt").write_text("some text\n")
        return ["data", "text", "--data-dir", str(tmp / "afile" / "d"), "--train", str(tmp / "c.txt")]
    if name == "tokenizer_input_missing":  # was trained on the path string itself
        return ["tokenizer", "train", "--input", str(tmp / "nowhere.txt"), "--out", str(tmp / "tok")]
    if name == "tokenizer_vocab_too_large":
        (tmp / "c.txt").write_text("hello world this is a tiny corpus.\nanother line here.\n")
        return ["tokenizer", "train", "--input", str(tmp / "c.txt"), "--out", str(tmp / "tok")]
    if name == "tokenizer_vocab_below_characters":
        (tmp / "cjk.txt").write_text("".join(chr(0x4E00 + i) for i in range(600)) + "\n")
        return ["tokenizer", "train", "--input", str(tmp / "cjk.txt"), "--out", str(tmp / "tok"),
                "--vocab-size", "300"]
    if name == "tokenizer_one_huge_line":
        (tmp / "big.txt").write_text("word " * 8000)
        return ["tokenizer", "train", "--input", str(tmp / "big.txt"), "--out", str(tmp / "tok"),
                "--vocab-size", "300"]
    if name == "tokenizer_truncated_gz":
        import gzip

        data = gzip.compress(b"some text line here.\n" * 5000)
        (tmp / "c.txt.gz").write_bytes(data[:len(data) // 2])
        return ["tokenizer", "train", "--input", str(tmp / "c.txt.gz"), "--out", str(tmp / "tok"),
                "--vocab-size", "300"]
    if name == "tokenizer_decode_out_of_range":
        return ["tokenizer", "decode", "--tokenizer", os.path.join(FIXTURES, "tokenizer_bpe"), "5", "99999"]
    if name == "tokenizer_not_a_model_file":
        (tmp / "notes.txt").write_text("not a tokenizer")
        return ["tokenizer", "encode", "--tokenizer", str(tmp / "notes.txt"), "hello"]
    if name == "data_text_given_pairs":
        (tmp / "p.jsonl").write_text(json.dumps({"document": "a b", "summary": "c"}) + "\n")
        return ["data", "text", "--data-dir", str(tmp / "d"), "--train", str(tmp / "p.jsonl")]
    if name == "data_pairs_given_text":
        (tmp / "t.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
        return ["data", "pairs", "--data-dir", str(tmp / "d"), "--train", str(tmp / "t.jsonl")]
    if name == "data_pairs_tsv_without_header":
        (tmp / "p.tsv").write_text("a long document\ta summary\nanother\tone\n")
        return ["data", "pairs", "--data-dir", str(tmp / "d"), "--train", str(tmp / "p.tsv")]
    if name == "generate_input_is_a_directory":
        (tmp / "docs").mkdir()
        return ["generate", "--checkpoint", os.path.join(FIXTURES, "bart_default"), "--tokenizer",
                os.path.join(FIXTURES, "tokenizer_bpe"), "--input", str(tmp / "docs")]
    if name == "base_config_on_this_machine":  # sized for GPU pods: refused before allocating anything
        return ["pretrain", "--config", "base", w]
    if name in ("pretrain_on_pairs", "finetune_on_text"):
        from bart_jax.data import datasets

        (tmp / "t.txt").write_text("".join(f"document number {i}.\n" for i in range(4)))
        (tmp / "p.jsonl").write_text("".join(json.dumps({"document": f"d {i}", "summary": "s"}) + "\n"
                                             for i in range(4)))
        text = datasets.prepare_text_corpus({"train": [tmp / "t.txt"]}, tmp / "d", holdout_every=2)
        pairs = datasets.prepare_pairs({"train": [tmp / "p.jsonl"]}, tmp / "d", holdout_every=2)
        if name == "pretrain_on_pairs":
            return ["pretrain", w, f"data.pretrain_source={pairs.path}"]
        return ["finetune", w, f"data.finetune_source={text.path}", "finetune.init_from=null"]
    if name == "data_negative_holdout":
        (tmp / "c.txt").write_text("some text\n")
        return ["data", "text", "--data-dir", str(tmp / "d"), "--train", str(tmp / "c.txt"), "--holdout-every", "-3"]
    if name == "run_batch_size_zero":
        return ["run", "--workdir", _workdir(tmp), "--batch-size", "0"]
    raise KeyError(name)


# (row, command, message regex, workdir must not be created)
ROWS = [
    ("noise_preset", "pretrain", "unknown noise preset 'nosuch'", True),
    ("model_preset", "pretrain", "unknown preset 'nosuch'", True),
    ("model_dtype", "pretrain", "dtype='float17'", True),
    ("length_vs_positions", "pretrain", r"source_length=4096 exceeds the model's max_position_embeddings=128", True),
    ("finetune_target_length", "finetune", r"target_length=4096 exceeds .*max_position_embeddings", True),
    ("mesh_vs_devices", "pretrain", r"do not divide the 8 available devices", True),
    ("run_bad_noise", "run", "unknown noise preset 'nosuch'", True),
    ("run_pairs_without_test", "run", r"finetune data .* has no 'test' split", False),
    ("finetune_without_pretrain", "finetune", r"init_from='run:pretrain'.*does not exist; run `bart-jax pretrain`",
     True),
    ("workdir_under_file", "pretrain", r"afile is a file, not a directory", False),
    ("convert_empty_dir", "convert", "not a Hugging Face", False),
    ("convert_truncated_safetensors", "convert", "corrupt or unreadable safetensors", False),
    ("convert_gpt2_config", "convert", r"model_type='gpt2' is not BART", False),
    ("convert_missing_path", "convert", "no such checkpoint file or directory", False),
    ("convert_random_model_pt", "convert", r"model.pt: not a PyTorch checkpoint", False),
    ("convert_into_nonempty_dir", "convert", r"is not empty and is not a model directory.*; refusing", False),
    ("convert_over_model_without_overwrite", "convert", r"already holds a model; pass --overwrite", False),
    ("convert_onto_itself", "convert", "is the source checkpoint", False),
    ("convert_overwrite_user_folder", "convert", r"proj is not empty and is not a model directory", False),
    ("convert_overwrite_model_with_user_file", "convert", r"m is not empty and is not a model directory", False),
    ("data_text_empty_file", "data", r"split 'train': no non-empty examples in .*empty.txt", False),
    ("data_pairs_all_empty", "data", r"split 'train': no non-empty examples .*empty_pairs': 3", False),
    ("tokenizer_empty_file", "tokenizer", "no text to train on", False),
    ("tokenizer_latin1_file", "tokenizer", r"latin.txt:1: undecodable bytes \(not UTF-8\)", False),
    ("tokenizer_out_under_file", "tokenizer", r"--out .*afile is a file, not a directory", False),
    ("data_dir_under_file", "data", r"--data-dir .*afile is a file, not a directory", False),
    ("tokenizer_input_missing", "tokenizer", r"--input .*nowhere.txt: no such file", False),
    ("tokenizer_vocab_too_large", "tokenizer", r"vocabulary size 8000 is more than .* \(at most \d+ pieces\)", False),
    ("tokenizer_vocab_below_characters", "tokenizer", r"vocabulary size 300 is less than the \d+ distinct", False),
    ("tokenizer_one_huge_line", "tokenizer", r"SentencePiece trains on lines", False),
    ("tokenizer_truncated_gz", "tokenizer", r"c.txt.gz: truncated or corrupt gzip file", False),
    ("tokenizer_decode_out_of_range", "tokenizer", r"ids \[99999\] are outside the tokenizer's vocabulary", False),
    ("tokenizer_not_a_model_file", "tokenizer", r"notes.txt: not a SentencePiece tokenizer model", False),
    ("data_text_given_pairs", "data", r"missing field 'text'.*looks like summarization pairs.*data pairs", False),
    ("data_pairs_given_text", "data", r"missing field 'document'.*looks like a text corpus.*data text", False),
    ("data_pairs_tsv_without_header", "data", r"p.tsv:1: the first line of a TSV file is its header row", False),
    ("generate_input_is_a_directory", "generate", r"--input .*docs: is a directory", False),
    ("base_config_on_this_machine", "pretrain", r"needs more memory than a device here has.*sized for GPU", True),
    ("pretrain_on_pairs", "pretrain", r"data.pretrain_source=.*: holds summarization pairs, but pretrain reads "
     r"a text corpus \(build them with `bart-jax data text`\)", False),
    ("finetune_on_text", "finetune", r"holds a text corpus, but finetune reads summarization pairs", False),
    ("data_negative_holdout", "data", r"--holdout-every=-3: must be >= 0", False),
    ("run_batch_size_zero", "run", r"--batch-size=0: must be >= 1", True),
    ("generate_negative_source_length", "generate", r"--max-source-length=-5: must be >= 1", False),
    ("generate_output_under_file", "generate", r"--output .*afile is a file, not a directory", False),
    ("evaluate_output_dir_under_file", "evaluate", r"--output-dir .*afile is a file, not a directory", False),
]


@pytest.mark.parametrize("row, command, message, no_workdir", ROWS, ids=[r[0] for r in ROWS])
def test_user_error_is_one_line_exit_2(row, command, message, no_workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything created by a default relative path stays in tmp_path
    argv = _setup_row(row, tmp_path)
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    _assert_one_line_error(capsys, command, message)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a pre-existing file changed or vanished"
    if no_workdir:  # validation came before any tokenizer, dataset or directory work
        assert not os.path.exists(_workdir(tmp_path)) and not os.path.exists(tmp_path / "runs")


def test_read_only_workdir_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A read-only file system (or a directory without write permission) as the workdir's parent. The
    test runs as root on a writable disk, so access(2) is made to answer as a read-only mount would."""
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    assert main(["pretrain", f"workdir={tmp_path / 'run'}"]) == 2
    _assert_one_line_error(capsys, "pretrain", r"is not writable \(read-only file system or no permission\)")
    assert os.listdir(tmp_path) == []


def test_platform_the_machine_lacks_is_one_line(tmp_path, monkeypatch, capsys):
    import jax

    def no_such_platform(*args, **kwargs):
        raise RuntimeError("Unable to initialize backend 'cuda': no such platform")

    monkeypatch.setattr(jax, "devices", no_such_platform)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert main(["pretrain", f"workdir={tmp_path / 'run'}"]) == 2
    _assert_one_line_error(capsys, "pretrain", r"JAX_PLATFORMS='cuda': JAX cannot start it on this machine")
    assert main(["generate", "--checkpoint", str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "generate", r"JAX_PLATFORMS='cuda'")
    assert not os.path.exists(tmp_path / "run")


def test_a_command_checks_its_config_once(tmp_path, monkeypatch, capsys):
    from bart_jax.cli import train as cli_train
    from bart_jax.train import loop, preflight

    calls, check = [], preflight.check_run_config

    def counting(cfg, stages=("pretrain", "finetune")):
        calls.append(tuple(stages))
        return check(cfg, stages)

    for module in (loop, cli_train):  # every module that may hold the check
        monkeypatch.setattr(module, "check_run_config", counting, raising=False)
    # A config that passes the check and fails right after it (no such dataset directory).
    assert main(["pretrain", f"workdir={tmp_path / 'run'}", f"data.pretrain_source={tmp_path / 'none'}"]) == 2
    assert calls == [("pretrain",)]


def test_version_and_debug_logging(capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"bart-jax \S+ \(jax \S+, flax \S+, optax \S+\)\n", capsys.readouterr().out)
    root, ours = logging.getLogger(), logging.getLogger("bart_jax")
    saved = root.level, ours.level
    try:
        with pytest.raises(ValueError):
            main(["--debug", "convert", "/nonexistent-model-dir", "/nonexistent-out"])
        # bart_jax's debug messages on, JAX's and every other library's not
        assert ours.getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("jax").getEffectiveLevel() >= logging.WARNING
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def test_data_prints_a_pasteable_override(tmp_path, capsys):
    (tmp_path / "my corpus.txt").write_text("".join(f"document number {i}.\n" for i in range(4)))
    assert main(["data", "text", "--data-dir", str(tmp_path / "d"), "--train", str(tmp_path / "my corpus.txt"),
                 "--holdout-every", "0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data.pretrain_source="))
    import shlex

    (value,) = shlex.split(line.split("=", 1)[1])
    assert os.path.isabs(value) and os.path.isdir(value)


def test_generate_says_how_many_documents_were_truncated(caplog):
    from bart_jax import preset
    from bart_jax.data.tokenizer import load_tokenizer
    from bart_jax.decode.generate import generate_texts
    from bart_jax.model import Bart

    import jax
    import jax.numpy as jnp

    config = preset("tiny", vocab_size=512, d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32,
                    decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                    max_position_embeddings=16)
    ids = jnp.ones((1, 4), jnp.int32)
    params = Bart(config).init(jax.random.PRNGKey(0), ids, ids, ids)["params"]
    tok = load_tokenizer(os.path.join(FIXTURES, "tokenizer_bpe"))
    docs = ["short one.", "a much longer document " * 20, "another very long document " * 20]
    with caplog.at_level(logging.WARNING, logger="bart_jax"):
        list(generate_texts(docs, config, params, tok, batch_size=2, num_beams=1, max_length=4))
    assert any("2 of 3 documents were longer than 16 tokens" in r.getMessage() for r in caplog.records)


def test_debug_flag_reraises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face"):
        main(["--debug", "convert", str(tmp_path / "empty"), str(tmp_path / "out")])


def test_builtin_defaults_are_valid():
    """`bart-jax pretrain|finetune|run` with no --config: the built-in defaults pass the whole check."""
    from bart_jax.train.config import DEFAULT_CONFIG, load_config
    from bart_jax.train.preflight import check_run_config

    cfg = load_config(None)
    cfg.noise.noise_config()
    check_run_config(cfg)
    check_run_config(load_config(DEFAULT_CONFIG))


# ------------------------------------------------------------------------------- convert keeps what it should
def test_convert_copies_tokenizer_and_overwrite_replaces_only_a_model_dir(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(FIXTURES, "bart_default"), src)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(FIXTURES, "tokenizer_bpe", name), src / name)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out)]) == 0
    assert (out / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()
    assert (out / "merges.txt").exists() and (out / "bart_config.json").exists()
    # an existing model directory is replaced only when asked, and then leaves nothing stale behind
    assert main(["convert", str(src), str(out), "--to", "hf", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []


def test_convert_overwrite_through_a_link_replaces_the_model_it_names(tmp_path, capsys):
    real = tmp_path / "models" / "bart"
    _copy_model(real)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    assert main(["convert", os.path.join(FIXTURES, "bart_default"), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert sorted(os.listdir(real)) == ["bart_config.json", "params.safetensors"]
    assert [n for d in (tmp_path, real.parent) for n in os.listdir(d) if n.startswith(".tmp-")] == []


def test_model_dir_write_is_atomic_and_leftovers_do_not_block(tmp_path):
    from bart_jax.convert.checkpoints import _atomic_write_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("old")
    (tmp_path / "model.old").mkdir()  # left by an interrupted write of the old code
    (tmp_path / "model.old" / "x").write_text("x")
    (tmp_path / ".tmp-model-crashed").mkdir()  # left by a crashed write

    def write(d):
        with open(os.path.join(d, "b"), "w") as f:
            f.write("new")

    _atomic_write_dir(str(target), write)
    assert sorted(os.listdir(target)) == ["b"]
    assert not (tmp_path / ".tmp-model-crashed").exists()

    def fail(d):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _atomic_write_dir(str(target), fail)
    assert sorted(os.listdir(target)) == ["b"]  # the old directory is untouched by a failed write
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []


# ------------------------------------------------------------------------------- evaluate writes as it goes
def test_evaluate_keeps_predictions_made_before_an_interrupt(tmp_path, monkeypatch, capsys):
    from bart_jax.cli import decode as decode_cli

    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"document": f"doc {i}", "summary": "s"}) + "\n" for i in range(4)))

    def two_then_ctrl_c(documents, *args, **kwargs):
        for i, _ in enumerate(documents):
            if i == 2:
                raise KeyboardInterrupt
            yield [f"prediction {i}"], [0.0]

    def tiny_model(path, tokenizer_path=None, **overrides):
        from bart_jax import preset
        from bart_jax.data.tokenizer import load_tokenizer

        return preset("tiny", vocab_size=401), None, load_tokenizer(os.path.join(FIXTURES, "tokenizer_bpe"))

    monkeypatch.setattr(decode_cli, "generate_texts", two_then_ctrl_c)
    monkeypatch.setattr(decode_cli, "load_model_for_inference", tiny_model)
    argv = ["evaluate", "--checkpoint", os.path.join(FIXTURES, "bart_default"), "--data", str(pairs),
            "--split", "test", "--output-dir", str(tmp_path / "eval")]
    try:
        rc = main(argv)
    except KeyboardInterrupt:  # (would stop the whole pytest session)
        pytest.fail("Ctrl-C escaped the CLI as a KeyboardInterrupt")
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bart-jax evaluate: interrupted"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.test.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["prediction 0", "prediction 1"]


# ------------------------------------------------------------------------------- locks
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    from bart_jax.runlock import run_directory_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(f"{pid} 2020-01-01T00:00:00Z\n")
    with caplog.at_level(logging.WARNING, logger="bart_jax.runlock"):
        with run_directory_lock(tmp_path):
            assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
            with run_directory_lock(tmp_path):  # re-entrant in one process (the main job and its stages)
                pass
    assert f"taking over the lock left by pid {pid}" in caplog.text and "no longer running" in caplog.text


def test_same_dataset_built_by_two_builders_at_once(tmp_path):
    from bart_jax.data.datasets import prepare_text_corpus

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document number {i}.\n" for i in range(50)))
    results, errors = [], []

    def build():
        try:
            results.append(prepare_text_corpus({"train": [corpus]}, tmp_path / "data"))
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2
    assert results[0].path == results[1].path and len(results[0]["train"]) == len(results[1]["train"]) == 50


# ------------------------------------------------------------------------------- subprocesses: signals, lock
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small tokenizer and prepared corpus, so a training subprocess starts in seconds."""
    from bart_jax.data import train_tokenizer
    from bart_jax.data.datasets import prepare_text_corpus

    root = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([str(root / "corpus.txt")], 320, root / "tok")
    ds = prepare_text_corpus({"train": [root / "corpus.txt"], "validation": [root / "corpus.txt"]}, root / "data")
    return str(root / "tok"), ds.path


def _train_argv(workdir, tiny_data, steps=100000, progress_bar=False):
    tok, data = tiny_data
    return [sys.executable, "-m", "bart_jax.cli", "pretrain", "--config", TINY, f"workdir={workdir}",
            f"data.tokenizer={tok}", f"data.pretrain_source={data}", f"pretrain.train.steps={steps}",
            "pretrain.train.batch_size=4", "pretrain.train.source_length=16", "pretrain.schedule.warmup_steps=0",
            f"pretrain.train.progress_bar={str(progress_bar).lower()}", "pretrain.train.log_every=1",
            "pretrain.train.eval_every=0", "pretrain.train.checkpoint_every=100000",
            "pretrain.train.peak_flops_per_device=1e9",
            *SMALL_MODEL_OVERRIDES]  # the signals, lock and resume do not depend on the model's size


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
            "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _start_training(workdir, tiny_data, log):
    out = open(log, "w")
    proc = subprocess.Popen(_train_argv(workdir, tiny_data), cwd=ROOT, env=_env(), stdout=out,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def _wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training did not get going in time")
        time.sleep(0.2)


def _training_step(log) -> int:
    steps = re.findall(r"pretrain step (\d+):", open(log).read())
    return int(steps[-1]) if steps else 0


@pytest.mark.integration
def test_sigint_checkpoints_at_step_boundary_and_resume_says_so(tmp_path, tiny_data):
    workdir, log = tmp_path / "run", tmp_path / "train.log"
    proc, out = _start_training(workdir, tiny_data, log)
    try:
        _wait_for(lambda: _training_step(log) >= 2, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        out.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"bart-jax pretrain: interrupted at step (\d+) \(pretrain\); checkpoint saved in "
                         r"(\S+); run the same command to resume", last)
    assert match, last
    step = int(match.group(1))
    assert step >= 2 and match.group(2) == str(workdir / "pretrain" / "checkpoints" / str(step))
    assert os.path.isdir(match.group(2))
    # Resuming (with a progress bar this time) says where it starts from. The run is shortened to end one
    # step later, a change of `steps` that a resume only accepts when asked to.
    resumed = subprocess.run(_train_argv(workdir, tiny_data, steps=step + 1, progress_bar=True)
                             + ["--allow-config-change"], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout + resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["final_step"] == step + 1


@pytest.mark.integration
def test_second_process_on_a_run_directory_fails_at_once_and_sigterm_saves(tmp_path, tiny_data):
    workdir, log = tmp_path / "run", tmp_path / "train.log"
    proc, out = _start_training(workdir, tiny_data, log)
    try:
        _wait_for(lambda: _training_step(log) >= 1, proc)
        before = _snapshot(workdir / "pretrain" / "checkpoints")
        second = subprocess.run(_train_argv(workdir, tiny_data), cwd=ROOT, env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert re.fullmatch(rf"bart-jax pretrain: error: run directory {re.escape(str(workdir))} is in use by "
                            rf"pid {proc.pid} \(started [0-9T:Z-]+\); .*", second.stderr.strip().splitlines()[-1])
        assert proc.poll() is None, "the first run was disturbed"
        assert _snapshot(workdir / "pretrain" / "checkpoints").keys() >= before.keys()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        out.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert re.search(r"interrupted at step \d+ \(pretrain\); checkpoint saved in ", err.strip().splitlines()[-1])
    assert (workdir / ".lock").read_text() == ""  # released on the way out


@pytest.mark.integration
def test_error_after_checkpointer_start_prints_nothing_after_it(tmp_path, tiny_data):
    """A user error raised once orbax's checkpoint manager exists: its threads are shut down first, so the
    one-line message is the last thing printed (no 'cannot schedule new futures' traceback)."""
    # Leftovers of crashed saves keep orbax's clean-up thread busy past the error (deterministically).
    for i in range(300):
        os.makedirs(tmp_path / "run" / "pretrain" / "checkpoints" / f"{i}.orbax-checkpoint-tmp-{i}" / "state")
    argv = _train_argv(tmp_path / "run", tiny_data) + ["model.vocab_size=300"]  # tokenizer has 320 ids
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(r"bart-jax pretrain: error: the tokenizer has 320 tokens but model.vocab_size is 300; .*",
                        proc.stderr.strip().splitlines()[-1])


def _cache_dir_after_dispatch(env: dict) -> str:
    """jax's persistent-cache directory after `bart-jax evaluate --help` ran in a fresh process with `env`."""
    code = ("import contextlib, io, jax; from bart_jax.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['evaluate', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(jax.config.jax_compilation_cache_dir)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.integration  # runs the compiling commands end to end
def test_compiling_commands_keep_a_persistent_compilation_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # by default under the user's cache directory, so reruns and the main job's second fine-tune skip compiling
    assert _cache_dir_after_dispatch({**env, "XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "bart_jax" / "xla")
    # JAX's own variable chooses the directory instead
    chosen = str(tmp_path / "chosen")
    assert _cache_dir_after_dispatch({**env, "JAX_COMPILATION_CACHE_DIR": chosen}) == chosen
    # an unusable location means no cache, not an error
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _cache_dir_after_dispatch({**env, "XDG_CACHE_HOME": str(blocker)}) == "None"
