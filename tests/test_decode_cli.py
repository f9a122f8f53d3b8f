"""`bart-jax generate` / `bart-jax evaluate` end to end on a tiny checkpoint, and ROUGE (rouge-score)."""

import io
import json
import shutil
from pathlib import Path

import jax
import pytest

from bart_jax import init_params, preset
from bart_jax.cli import main as bart_jax_main
from bart_jax.cli.decode import cli_generate
from bart_jax.decode.files import load_model_for_inference
from bart_jax.decode.generate import summarize
from bart_jax.decode.rouge import rouge_scores, sentences_per_line

FIXTURES = Path(__file__).parent / "fixtures"
CONTROLS = ["--num-beams", "2", "--max-length", "8", "--batch-size", "2"]
DOCS = ["The quick brown fox jumps over the lazy dog.", "Hello world", "Return the string with spaces.",
        "def f(x): return x + 1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face-format directory: a tiny random BART sized for the fixture BPE tokenizer (401 ids)."""
    from bart_jax.convert import save_pretrained

    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = preset("tiny", vocab_size=401, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=64, dropout=0.0)
    save_pretrained(directory, config, init_params(config, jax.random.PRNGKey(0)))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / "tokenizer_bpe" / name, directory / name)
    return str(directory)


@pytest.mark.integration
def test_generate_streams_a_file(checkpoint, tmp_path, capsys):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out.txt"
    assert cli_generate(["--checkpoint", checkpoint, "--input", str(source), "--output", str(out), *CONTROLS]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(DOCS)
    config, params, tokenizer = load_model_for_inference(checkpoint)
    expected = summarize(DOCS, config, params, tokenizer, batch_size=2, num_beams=2, max_length=8,
                         no_repeat_ngram_size=3, early_stopping=True, length_penalty=1.0, min_length=0)
    assert lines == [" ".join(s.split()) for s in expected]
    assert "generated 4 documents" in capsys.readouterr().err


@pytest.mark.integration
def test_generate_jsonl_stdin_and_return_sequences(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3])))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", checkpoint, "--input", "-", "--output", str(out), "--text-field", "text",
            "--num-return-sequences", "2", *CONTROLS]
    assert bart_jax_main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    for r in records:
        assert len(r["summaries"]) == 2 and len(r["scores"]) == 2 and r["scores"][0] >= r["scores"][1]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent"], "no such checkpoint"),
    (["--preset", "nope"], "named presets"),
    (["--input", "/nonexistent.txt"], "no such file"),
    (["--max-length", "500"], "max_length"),
    (["--early-stopping", "true", "--num-return-sequences", "3"], "num_return_sequences"),
])
def test_generate_bad_arguments(checkpoint, argv, message, capsys):
    assert bart_jax_main(["generate", "--checkpoint", checkpoint, *CONTROLS, *argv]) == 2  # later flags win
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_evaluate_writes_predictions_and_rouge(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"document": d, "summary": d.split()[0] + " things. More words."}) + "\n"
                             for d in DOCS))
    out_dir = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", checkpoint, "--data", str(pairs), "--split", "test", "--limit", "3",
            "--output-dir", str(out_dir), "--preset", "xsum", *CONTROLS]
    assert bart_jax_main(argv) == 0
    predictions = [json.loads(line) for line in (out_dir / "predictions.test.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and predictions[0]["document"] == DOCS[0]
    report = json.loads((out_dir / "rouge.test.json").read_text())
    assert report["examples"] == 3 and report["controls"]["num_beams"] == 2  # CLI overrides the preset
    assert report["controls"]["min_length"] == 11  # ... and the rest comes from the xsum preset
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0.0 <= report[name] <= 100.0


def test_evaluate_missing_data(checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", checkpoint, "--data", str(tmp_path / "none.jsonl"), *CONTROLS]
    assert bart_jax_main(["evaluate", *argv]) == 2
    assert "no such dataset" in capsys.readouterr().err


def test_tokenizer_model_mismatch(tmp_path):
    from bart_jax.convert import save_pretrained

    config = preset("tiny", vocab_size=300, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=64)
    save_pretrained(tmp_path / "m", config, init_params(config, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="no tokenizer"):
        load_model_for_inference(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="do not belong together"):
        load_model_for_inference(str(tmp_path / "m"), str(FIXTURES / "tokenizer_bpe"))


# ----------------------------------------------------------------------------- ROUGE
def test_rouge_lsum_uses_sentences():
    """Lsum must differ from L on multi-sentence text with reordered sentences (transformers #6808)."""
    prediction = "The cat sat on the mat. It was happy. Dogs ran away."
    reference = "Dogs ran away. The cat sat on the mat. It was very happy."
    scores = rouge_scores([prediction], [reference])
    assert scores["rougeLsum"] > scores["rougeL"] + 10.0
    assert sentences_per_line(prediction) == "The cat sat on the mat.\nIt was happy.\nDogs ran away."


def test_rouge_values():
    assert rouge_scores(["a b c. d e."], ["a b c. d e."]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0})
    stemmed = rouge_scores(["the dogs were running"], ["the dog was run"])  # Porter stemming
    assert stemmed["rouge1"] == pytest.approx(75.0)
    assert rouge_scores(["x y"], ["z w"])["rouge1"] == 0.0
    with pytest.raises(ValueError, match="references"):
        rouge_scores(["a"], [])
