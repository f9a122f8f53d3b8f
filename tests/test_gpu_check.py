"""bench/gpu_check.sh / gpu_check.py: the GPU measurement script runs on the GPU machine's software, proven on
CPU. That machine has jax, flax, optax, orbax, chex, numpy, pyyaml, safetensors, sentencepiece, torch and
transformers, and NOT the packages listed in BLOCKED; it has no package index, so what the measured code
needs beyond its software travels as wheels (bench/wheels/). Each test here runs the script in a process
where BLOCKED cannot be imported from this environment (a meta-path finder in a sitecustomize), with the
project installed the way gpu_check.sh installs it there."""

import json
import os
import subprocess
import sys
import textwrap

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow_datasets", "grain", "array_record", "omegaconf", "rouge_score", "nltk", "tensorboardX")

# Imported at interpreter start (it is on PYTHONPATH): a top-level module in $BLOCK_MODULES that would come
# from this interpreter's own site-packages raises ModuleNotFoundError, as on a machine without it; the same
# module from anywhere else (what gpu_check.sh installs into its own directory) imports normally. Blocking
# bart_jax this way also hides the checkout's editable install (its finder comes after this one).
SITECUSTOMIZE = textwrap.dedent('''
    import importlib.machinery, os, site, sys

    BLOCK = set(filter(None, os.environ.get("BLOCK_MODULES", "").split(",")))
    SITE = tuple(os.path.realpath(p) + os.sep for p in site.getsitepackages())


    class Block:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if "." in name or name not in BLOCK:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations or ()), "")) \\
                if spec else ""
            if spec is None or where.startswith(SITE):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU machine)",
                                          name=name)
            return spec


    sys.meta_path.insert(0, Block)
''')


def _env(tmp_path, blocked=BLOCKED, **extra):
    site_dir = tmp_path / "block"
    site_dir.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_COMPILATION_CACHE_DIR")}
    return {**env, "PYTHONPATH": str(site_dir), "BLOCK_MODULES": ",".join(blocked), "PYTHON": sys.executable,
            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), **extra}


def test_smoke_runs_where_the_gpu_machines_missing_packages_cannot_be_imported(tmp_path):
    # bart_jax too: the GPU machine has none but the one the script installs from the working tree.
    env = _env(tmp_path, blocked=BLOCKED + ("bart_jax",), OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path),
               GPU_CHECK_TIMEOUT_S="1700")
    # The blocker works: this interpreter's omegaconf cannot be imported under it, nor the checkout's bart_jax.
    probe = subprocess.run([sys.executable, "-c", "import omegaconf"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", "import bart_jax"], env=env, capture_output=True, text=True,
                           cwd=str(tmp_path))
    assert probe.returncode != 0 and "No module named 'bart_jax'" in probe.stderr
    # (the timeout is for CPU-bound compiles on a loaded 2-core machine)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--smoke", "--budget-s", "100000"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"train", "attention", "logits", "xsum", "peer"}, stages
    assert all(stages[s].startswith("ok") for s in ("train", "attention", "logits", "xsum")), stages
    # This interpreter has no torch: the PyTorch peer is skipped, says why, and is not a failure.
    assert stages["peer"].startswith("skipped") and "torch" in stages["peer"], stages["peer"]
    # omegaconf came from the shipped wheel and bart_jax from the script's own install, not from this environment.
    assert report["modules"]["omegaconf"].startswith(str(tmp_path)), report["modules"]
    assert report["modules"]["bart_jax"].startswith(str(tmp_path)), report["modules"]

    # The real pretraining recipe (LAMB from the run config, on-device noise, its loss) for both configs.
    assert [r["model"] for r in report["train"]] == ["base", "large"]
    for row in report["train"]:
        assert row["optimizer"] == "lamb" and row["noise"] == "bart_large" and row["batch"] > 0
        assert len(row["step_s_repeats"]) == row["repeats"] >= 2 and row["step_s"] > 0 and row["mfu"] > 0
        assert row["target_length"] == row["tokens"] and 0 < row["source_length"] <= row["tokens"]
        assert row["scale_prediction"]["peak_bytes"] > 0, row["scale_prediction"]
    attention = report["attention"]
    assert attention["default_picks"] == "explicit"  # on CPU; the GPU reports xla or cudnn
    assert attention["variants"]["cudnn"]["compiled"] is False  # no cuDNN off a GPU: reported, not fatal
    logits = report["logits"]
    assert 0 < logits["random"]["bf16_vs_fp32_highest"]["max_abs"] < logits["random"]["logit_scale"]
    assert logits["fixture"]["fp32_vs_reference"]["max_abs"] < 1e-4
    xsum = report["xsum"]
    assert xsum["sequences_per_s"] > 0 and xsum["nvidia_a100_seq_per_s"] == 17.7
    assert xsum["controls"]["min_length"] < xsum["controls"]["max_length"]  # real lengths, not min = max
    assert len(set(xsum["source_lengths"])) > 1
    assert "gpu_check" in proc.stdout and "wrote" in proc.stdout


def test_preflight_lists_every_missing_module_in_one_line(tmp_path):
    env = _env(tmp_path, blocked=("omegaconf", "optax", "chex"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: error: missing python modules: chex, omegaconf, optax"), line
    assert "Traceback" not in proc.stdout + proc.stderr


def test_refuses_a_backend_that_is_not_a_gpu_without_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = _env(tmp_path, blocked=())
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check: error: the JAX backend is cpu, not a GPU"), line
    assert not out.exists()


def _pick(monkeypatch, deadline_s: float, limit_gib: float, first_batch: int = 128):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check

    gib = 2 ** 30

    def compile_at(s, step, b):  # XLA's buffer assignment: 10 GiB of state, 6 GiB of gradients etc., 0.5 GiB a row
        return f"step{b}", 1.0, {"fixed_bytes": 10 * gib, "temp_bytes": (6 + 0.5 * b) * gib,
                                 "peak_bytes": (16 + 0.5 * b) * gib}

    monkeypatch.setattr(gpu_check, "compile_at", compile_at)
    plan = {"batch_grid": [8, 16, 32, 64, 96, 112, 128, 160, 192, 224, 256], "memory_margin": 0.92}
    tried = []
    gen = gpu_check.pick_batches(None, None, plan, {"first_batch": first_batch}, limit_gib * gib,
                                 gpu_check.time.monotonic() + deadline_s, tried)
    return gen, tried


def test_batch_search_takes_the_largest_grid_batch_xla_fits_then_falls_back(monkeypatch):
    gen, tried = _pick(monkeypatch, deadline_s=1e6, limit_gib=80)  # budget 0.92 * 80 = 73.6 GiB
    # 128 rows need 80 GiB; the line from that compile predicts 112 (72 GiB), and the line through both agrees.
    first = next(gen)
    assert first[0] == 112 and first[1] == "step112"
    assert [t["batch"] for t in tried] == [128, 112]
    # an out-of-memory error at run time moves down the grid
    assert [b for b, *_ in gen] == [96, 64, 32, 16, 8]


def test_batch_search_grows_a_fitting_first_batch_while_time_allows(monkeypatch):
    # budget 0.92 * 141 = 129.7 GiB; the start, 64 rows on 72 GiB, is 112 here (72 GiB): it fits, and grows
    gen, tried = _pick(monkeypatch, deadline_s=1e6, limit_gib=141, first_batch=64)
    assert next(gen)[0] == 224 and [t["batch"] for t in tried] == [112, 224]  # 224 rows: 128 GiB
    gen, tried = _pick(monkeypatch, deadline_s=0.0, limit_gib=141, first_batch=64)
    assert next(gen)[0] == 112 and [t["batch"] for t in tried] == [112]


def test_batch_search_steps_down_when_the_compiler_runs_out_of_memory(monkeypatch):
    gen, tried = _pick(monkeypatch, deadline_s=1e6, limit_gib=80)
    import gpu_check

    fits = gpu_check.compile_at

    def compile_at(s, step, b):
        if b > 100:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return fits(s, step, b)

    monkeypatch.setattr(gpu_check, "compile_at", compile_at)
    assert next(gen)[0] == 64
    assert "oom" in tried[0] and tried[0]["batch"] == 128 and tried[1]["batch"] == 64
