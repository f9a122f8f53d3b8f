"""bench/gpu_check.py --smoke: the GPU measurement script runs end to end on CPU with tiny shapes, so it is
ready (and still works) the day a GPU is lent."""

import json
import os
import subprocess
import sys

import pytest

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
           "PYTHONPATH": ROOT}
    # (the timeout is for CPU-bound compiles on a loaded 2-core machine)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke",
                           "--budget-s", "100000", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {"fixture", "cudnn", "train", "xsum"}
    assert all(v.startswith("ok") for v in report["stages"].values()), report["stages"]

    (train,) = report["train"]
    assert train["batch"] == 8 and train["tokens_per_s"] > 0 and train["model_flops_per_step"] > 0
    assert report["xsum"]["sequences_per_s"] > 0 and report["xsum"]["nvidia_a100_seq_per_s"] == 17.7
    logits = report["fixture_logits"]
    assert logits["fp32_vs_reference"]["max_abs"] < 1e-4  # the converted fixture matches its reference ...
    assert 0 < logits["bf16_vs_fp32"]["max_abs"] < 1.0  # ... and bf16 differs from fp32, but not wildly
    # On CPU the default attention compiles without cuDNN, and asking for cuDNN is reported, not fatal.
    assert report["cudnn"]["default"] == {**report["cudnn"]["default"], "compiled": True, "cudnn_attention": False}
    assert report["cudnn"]["cudnn"]["compiled"] is False
    assert "gpu_check" in proc.stdout and "wrote" in proc.stdout
