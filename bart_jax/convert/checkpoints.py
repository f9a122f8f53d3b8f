"""bart_jax's own model directory (bart_config.json + params.safetensors), Hugging Face directories out, and
`from_pretrained` for every format in. Directories are written atomically: readers see the old or the new
one, never a missing or half-written one."""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Callable

import numpy as np

from bart_jax.config import BartConfig
from bart_jax.convert.layout import (CheckpointError, expected_shapes, flatten, hf_state_dict_to_params,
                                     params_to_hf_state_dict, shape_problems, unflatten)
from bart_jax.convert.readers import (HF_CONFIG, HF_INDEX, HF_TORCH, HF_WEIGHTS, read_fairseq, read_hf_state,
                                      read_safetensors)

NATIVE_CONFIG = "bart_config.json"
NATIVE_WEIGHTS = "params.safetensors"
# Tokenizer files a model directory may carry beside its weights (written and copied along by `convert`).
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "sentencepiece.bpe.model")
# Every file a model directory written by bart_jax or Hugging Face holds; a directory with anything else in it
# is not one, whatever it is called.
_MODEL_DIR_FILES = frozenset((NATIVE_CONFIG, NATIVE_WEIGHTS, HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_TORCH,
                              "generation_config.json", "README.md", ".gitattributes") + TOKENIZER_FILES)
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_RENAME_EXCHANGE = 2  # linux/fs.h


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a model directory (what `convert --overwrite` may replace): a real directory (not a
    link) holding a BART config that parses, the weights it names, and nothing but the files model directories
    hold (weights, config, tokenizer files). A user's folder that merely has a `config.json` is not one."""
    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    if any(not os.path.isfile(os.path.join(path, n)) or os.path.islink(os.path.join(path, n))
           or not (n in _MODEL_DIR_FILES or _HF_SHARD.fullmatch(n)) for n in entries):
        return False
    if NATIVE_CONFIG in entries and NATIVE_WEIGHTS in entries:
        config_file = NATIVE_CONFIG
    elif HF_CONFIG in entries and any(n in entries for n in (HF_WEIGHTS, HF_INDEX, HF_TORCH)):
        config_file = HF_CONFIG
    else:
        return False
    try:
        with open(os.path.join(path, config_file)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not (isinstance(config, dict) and "d_model" in config and "vocab_size" in config):
        return False
    return config_file == NATIVE_CONFIG or config.get("model_type", "bart") in ("bart", "mbart")


def _fsync_path(path: str, directory: bool = False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS: the file system or kernel cannot exchange


def _atomic_write_dir(target: str, write: Callable[[str], None]):
    """Write a directory's files into a temp dir beside `target`, fsync them, then put it in place with
    one rename (an atomic exchange when `target` exists), so readers see the old or the new directory,
    never a missing or half-written one. Temp dirs left by an earlier crashed write are removed."""
    import glob
    import shutil

    # Through a link to the directory it names: the link stays a link, pointing at the new directory.
    target = os.path.realpath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    prefix = ".tmp-" + os.path.basename(target) + "-"
    for leftover in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                _fsync_path(os.path.join(tmp, name))
        _fsync_path(tmp, directory=True)
        if not os.path.isdir(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the old directory
        else:  # no atomic exchange here: keep the old one under the temp name until the new one is in
            old = tempfile.mkdtemp(prefix=prefix, dir=parent)
            os.rename(target, os.path.join(old, "old"))
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync_path(parent, directory=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(directory, config: BartConfig, params, *, extra: Callable[[str], None] | None = None):
    """Write a Hugging Face BART directory (config.json + model.safetensors) loadable by transformers.
    `extra(tmp_dir)` may add files (e.g. the tokenizer) to the same atomic write."""
    from safetensors.numpy import save_file
    state = params_to_hf_state_dict(config, params)

    def write(tmp):
        save_file(state, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, HF_CONFIG), "w") as f:
            json.dump(config.to_hf_config(), f, indent=2)
        if extra is not None:
            extra(tmp)
    _atomic_write_dir(directory, write)


def save_model(directory, config: BartConfig, params, *, extra: Callable[[str], None] | None = None):
    """Write bart_jax's own model directory: bart_config.json + params.safetensors (atomically).
    `extra(tmp_dir)` may add files (e.g. the tokenizer) to the same atomic write."""
    from safetensors.numpy import save_file
    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten(params).items()}

    def write(tmp):
        save_file(flat, os.path.join(tmp, NATIVE_WEIGHTS))
        with open(os.path.join(tmp, NATIVE_CONFIG), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
        if extra is not None:
            extra(tmp)
    _atomic_write_dir(directory, write)


def load_model(directory, **overrides):
    """Read a directory written by `save_model` -> (config, params)."""
    with open(os.path.join(directory, NATIVE_CONFIG)) as f:
        try:
            config = BartConfig.from_dict({**json.load(f), **overrides})
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{directory}/{NATIVE_CONFIG}: corrupt JSON ({e})") from e
    flat = read_safetensors(os.path.join(directory, NATIVE_WEIGHTS))
    expected = expected_shapes(config)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(flat))]
    problems += [f"unexpected {k}" for k in sorted(set(flat) - set(expected))]
    problems += shape_problems(flat, expected)
    if problems:
        raise CheckpointError(f"{directory} does not match its config:\n  " + "\n  ".join(problems))
    return config, _to_jax(unflatten(flat), config)


def _to_jax(params, config: BartConfig):
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=config.params_dtype), params)


def detect_format(path) -> str:
    """'hf', 'fairseq' or 'bart_jax' for a checkpoint path; CheckpointError if none fits."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".pt"):
            return "fairseq"
        raise CheckpointError(f"{path}: a file checkpoint must be a fairseq .pt; pass the directory for "
                              "Hugging Face or bart_jax checkpoints")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if os.path.exists(os.path.join(path, NATIVE_CONFIG)):
        return "bart_jax"
    if os.path.exists(os.path.join(path, HF_CONFIG)):
        return "hf"
    if os.path.exists(os.path.join(path, "model.pt")):
        return "fairseq"
    raise CheckpointError(f"{path}: not a Hugging Face ({HF_CONFIG}), fairseq (model.pt) or bart_jax "
                          f"({NATIVE_CONFIG}) checkpoint directory")


def from_pretrained(path, **config_overrides):
    """Load a Hugging Face, fairseq or bart_jax checkpoint -> (BartConfig, params as jax arrays).

    `config_overrides` replace architecture-neutral fields (e.g. dtype='bfloat16', dropout=0.0).
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "bart_jax":
        return load_model(path, **config_overrides)
    if kind == "hf":
        config = BartConfig.from_hf_config(path, **config_overrides)
        state, source = read_hf_state(path)
    else:
        source = path if os.path.isfile(path) else os.path.join(path, "model.pt")
        config, state = read_fairseq(source, config_overrides)
    return config, _to_jax(hf_state_dict_to_params(config, state, source), config)
