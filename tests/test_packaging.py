"""The package as users install it: configs and generation presets travel inside it (package data)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run from outside the repository, against the installed copy only.
CHECK = """
import json, os, sys
import bart_jax
assert bart_jax.__file__.startswith(sys.argv[1]), bart_jax.__file__
from bart_jax.decode.generate import load_generation_preset
from bart_jax.pipeline import DEFAULT_CONFIG
from bart_jax.train.config import load_config
cfg = load_config(DEFAULT_CONFIG)
print(json.dumps({"file": bart_jax.__file__, "workdir": cfg.workdir, "pretrain_steps": cfg.pretrain.train.steps,
                  "cnn_dm": load_generation_preset("cnn_dm"), "large": load_config("large").model.preset}))
"""


def _can_build_wheel() -> bool:
    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None  # bdist_wheel available


def _install(src: str, target: str, dist: str) -> str:
    """Install `src` non-editable into `target` (no dependencies, offline); returns how it was built."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if _can_build_wheel():
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src,
                        "-w", dist], check=True, env=env, cwd=dist)
        (wheel,) = [os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                       check=True, env=env, cwd=dist)
        return "wheel"
    # No bdist_wheel here (setuptools < 70.1 without the `wheel` package): setuptools' build_py copies
    # exactly the modules and package data a wheel would hold, from the same pyproject settings.
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", target], check=True, cwd=src, capture_output=True)
    return "build_py"


@pytest.mark.integration  # builds and installs the package
def test_installed_package_has_configs_and_presets(tmp_path):
    src = tmp_path / "src"  # a clean copy, so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in ("bart_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target, dist, elsewhere = tmp_path / "site", tmp_path / "dist", tmp_path / "elsewhere"
    for d in (dist, elsewhere):
        d.mkdir()
    how = _install(str(src), str(target), str(dist))
    yaml_files = sorted(os.path.relpath(os.path.join(d, f), target) for d, _, files in os.walk(target)
                        for f in files if f.endswith(".yaml"))
    assert "bart_jax/configs/tiny.yaml" in yaml_files and "bart_jax/configs/generation/cnn_dm.yaml" in yaml_files, (
        how, yaml_files)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=elsewhere, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["workdir"] == "runs/tiny" and report["pretrain_steps"] > 0
    assert report["cnn_dm"]["num_beams"] == 4 and report["cnn_dm"]["min_length"] == 56
    assert report["large"] == "bart-large"


def test_config_by_bundled_name_path_or_legacy_path(tmp_path, monkeypatch):
    from bart_jax.train.config import load_config

    by_name = load_config("tiny")
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml")) == by_name
    monkeypatch.chdir(tmp_path)  # where no configs/tiny.yaml file is
    assert load_config("configs/tiny.yaml") == by_name  # the docs' spelling, from any directory
    own = tmp_path / "tiny"  # an existing file wins over a bundled name
    own.write_text("workdir: mine\n")
    assert load_config(str(own)).workdir == "mine"
    with pytest.raises(ValueError, match=r"named configs: \['base', 'large', 'tiny'\]"):
        load_config("tinny")
