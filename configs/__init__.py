"""The run configs (`tiny`, `base`, `large`) and generation presets (`generation/*.yaml`) shipped with bart_jax.

This folder (the repository's top-level configs/) is the package `bart_jax.configs`; its YAML files are package
data, read through `importlib.resources`, so `bart-jax run` and `--preset cnn_dm` work from a wheel as well as
from a checkout. `--config` and `--preset` take a bundled name or a path to a YAML file.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from importlib.resources.abc import Traversable

GENERATION = "generation"


def _bundled(*parts: str) -> Traversable:
    return importlib.resources.files(__name__).joinpath(*parts)


def run_config_names() -> list[str]:
    """Names of the bundled run configs (e.g. ['base', 'large', 'tiny'])."""
    return sorted(p.name[:-5] for p in _bundled().iterdir() if p.name.endswith(".yaml"))


def preset_names() -> list[str]:
    """Names of the bundled generation presets (e.g. ['cnn_dm', 'default', 'xsum'])."""
    return sorted(p.name[:-5] for p in _bundled(GENERATION).iterdir() if p.name.endswith(".yaml"))


def _bundled_name(name_or_path: str) -> str | None:
    """The bundled name `name_or_path` refers to when it is not a file: 'tiny', 'tiny.yaml', or a
    `configs/tiny.yaml` path as the docs spell it, from any working directory."""
    head, base = os.path.split(os.path.normpath(name_or_path))
    stem = base[:-5] if base.endswith(".yaml") else base
    if not head or os.path.basename(head) in ("configs", GENERATION):
        return stem
    return None


def resolve(name_or_path: str | os.PathLike, kind: str = "run") -> Traversable:
    """A run config (kind 'run') or generation preset (kind 'generation') to read: an existing file as given,
    else the bundled file of that name. Raises ValueError listing the bundled names when neither exists."""
    text = os.fspath(name_or_path)
    if os.path.isfile(text):
        return pathlib.Path(text).absolute()
    name = _bundled_name(text)
    folder = (GENERATION,) if kind == GENERATION else ()
    names = preset_names() if kind == GENERATION else run_config_names()
    if name in names:
        return _bundled(*folder, name + ".yaml")
    if kind == GENERATION:
        raise ValueError(f"generation preset {text!r}: no such file; named presets: {names}")
    raise ValueError(f"cannot read config file {text!r}: no such file; named configs: {names}")


def read_text(name_or_path: str | os.PathLike, kind: str = "run") -> tuple[str, str]:
    """(where, YAML text) of a run config or generation preset (see `resolve`)."""
    source = resolve(name_or_path, kind)
    try:
        return str(source), source.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {source}: {e}") from e


def read_mapping(name_or_path: str | os.PathLike, kind: str = "run",
                 what: str = "a mapping") -> tuple[str, dict]:
    """(where, the YAML mapping) of a run config or generation preset (see `resolve`); ValueError naming the
    file when the YAML is invalid or not a mapping (`what` says what was expected)."""
    import yaml

    where, text = read_text(name_or_path, kind)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected {what}, got {type(data).__name__}")
    return where, data
