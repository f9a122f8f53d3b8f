"""The main job's quick mode, end to end: real training, real beam search, real ROUGE, files that reload."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bart_jax.pipeline import JobResult, lead_summary
from xla_env import xla_flags


def test_lead_summary_takes_first_sentence_and_truncates():
    assert lead_summary("Return the sum. Then more text.", 10) == "Return the sum."
    assert lead_summary("one two three four. five", 2) == "one two"


@pytest.mark.integration
def test_quick_main_job(tmp_path):
    # Run as a user runs it: the `bart-jax run` command in its own process, on one CPU device (this process
    # simulates 8 for the sharding tests).
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.run([sys.executable, "-m", "bart_jax", "run", "--quick", "--workdir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    printed = proc.stdout
    with open(tmp_path / "run" / "results" / "summary.json") as f:
        result = JobResult(**json.load(f))
    # the pretrained model is measured as a denoiser and the measurement printed, with one reconstruction
    assert set(result.denoiser) >= {"clean_accuracy", "noised_accuracy", "copy_accuracy", "example"}
    assert 0.0 <= result.denoiser["clean_accuracy"] <= 1.0 and 0.0 < result.denoiser["copy_accuracy"] <= 1.0
    assert set(result.denoiser["example"]) == {"clean", "noised", "reconstruction"}
    assert "reconstructing clean text from clean input" in printed and "copying the noised input" in printed
    # the printout ends with three test examples: document, reference, each system's summary
    examples = printed[printed.index("The first 3 test examples"):]
    assert examples.count("document:") == 3 and examples.count("reference:") == 3
    assert examples.count("lead:") == 3 and examples.count("pretrained+finetuned:") == 3
    # TFDS's own banners (with temporary directory names) stay out of the printout, and output to a pipe is
    # plain lines (no progress-bar frames)
    for stream in (proc.stdout, proc.stderr):
        assert "Downloading and preparing" not in stream and "incomplete." not in stream
        assert "\r" not in stream
    # every training stage ran and its loss fell
    for stage, losses in result.losses.items():
        assert len(losses) >= 20, stage
        assert np.all(np.isfinite(losses)), stage
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), stage
    # ROUGE was computed on real predictions for the three systems
    assert set(result.rouge) == {"pretrained+finetuned", "random-init finetuned", "lead (first sentence)"}
    for metrics in result.rouge.values():
        assert set(metrics) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert result.rouge["lead (first sentence)"]["rouge1"] > 0
    for path in result.predictions.values():
        rows = [json.loads(line) for line in open(path)]
        assert len(rows) == 16 and all(set(r) == {"document", "reference", "prediction"} for r in rows)
    assert result.test_pairs == 16  # `result` is summary.json, read above
    # the saved models reload for inference, with their tokenizer
    from bart_jax.decode.files import load_model_for_inference
    for name, model_dir in result.model_dirs.items():
        config, params, tok = load_model_for_inference(model_dir)
        assert tok.vocab_size <= config.vocab_size, name
    assert os.path.isdir(os.path.join(result.workdir, "pretrain", "checkpoints"))
    assert any(f.startswith("events") for _, _, files in os.walk(os.path.join(result.workdir, "pretrain"))
               for f in files), "no TensorBoard event files"
