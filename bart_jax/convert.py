"""Checkpoints in and out: Hugging Face BART/mBART directories, fairseq `model.pt`, and bart_jax's own format.

- `from_pretrained(path)` -> (BartConfig, params) for a Hugging Face directory (config.json with
  model.safetensors, a sharded safetensors index, or pytorch_model.bin), a fairseq checkpoint (model.pt),
  or a bart_jax model directory (bart_config.json + params.safetensors).
- `save_pretrained(dir, config, params)` writes a Hugging Face directory (config.json + model.safetensors).
- `save_model` / `load_model` write and read bart_jax's own directory.
No format needs torch: zip-format .bin/.pt files (torch >= 1.6) are unpickled with numpy; only legacy
pre-1.6 files need torch, and say so when it is missing. Every mismatch (missing,
unexpected or wrongly shaped tensors) is one error listing all the offending names.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Callable

import numpy as np

from bart_jax.config import BartConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TORCH = "pytorch_model.bin"
NATIVE_CONFIG = "bart_config.json"
NATIVE_WEIGHTS = "params.safetensors"

# fairseq bookkeeping entries that carry no weights.
_JUNK_SUFFIXES = ("version", "_float_tensor")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the architecture, or a file that cannot be read."""


# --------------------------------------------------------------------------- name/layout mapping
def _attention_entries(prefix_ours, prefix_hf, heads, head_dim, d):
    """(our path, HF name, to_ours, to_hf) for one attention block's q/k/v/out projections."""
    out = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        out.append((f"{prefix_ours}/{proj}/kernel", f"{prefix_hf}.{proj}.weight",
                    lambda w: w.T.reshape(d, heads, head_dim), lambda k: k.reshape(d, heads * head_dim).T))
        out.append((f"{prefix_ours}/{proj}/bias", f"{prefix_hf}.{proj}.bias",
                    lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(heads * head_dim)))
    out.append((f"{prefix_ours}/out_proj/kernel", f"{prefix_hf}.out_proj.weight",
                lambda w: w.T.reshape(heads, head_dim, d), lambda k: k.reshape(heads * head_dim, d).T))
    out.append((f"{prefix_ours}/out_proj/bias", f"{prefix_hf}.out_proj.bias", _same, _same))
    return out


def _same(x):
    return x


def _layer_entries(config: BartConfig, stack: str):
    """Per-layer entries for 'encoder' or 'decoder' (our path relative to <stack>/layers)."""
    d = config.d_model
    heads = config.encoder_attention_heads if stack == "encoder" else config.decoder_attention_heads
    entries = _attention_entries("self_attn", "self_attn", heads, d // heads, d)
    norms = ["self_attn_layer_norm", "final_layer_norm"]
    if stack == "decoder":
        entries += _attention_entries("encoder_attn", "encoder_attn", heads, d // heads, d)
        norms.append("encoder_attn_layer_norm")
    for fc in ("fc1", "fc2"):
        entries.append((f"ffn/{fc}/kernel", f"{fc}.weight", lambda w: w.T, lambda k: k.T))
        entries.append((f"ffn/{fc}/bias", f"{fc}.bias", _same, _same))
    for norm in norms:
        entries.append((f"{norm}/scale", f"{norm}.weight", _same, _same))
        entries.append((f"{norm}/bias", f"{norm}.bias", _same, _same))
    return entries


def _stack_entries(config: BartConfig, stack: str):
    """Entries outside the layers of one stack."""
    entries = [(f"{stack}/embed_positions/embedding", f"{stack}.embed_positions.weight", _same, _same),
               (f"{stack}/layernorm_embedding/scale", f"{stack}.layernorm_embedding.weight", _same, _same),
               (f"{stack}/layernorm_embedding/bias", f"{stack}.layernorm_embedding.bias", _same, _same)]
    if config.add_final_layer_norm:
        entries += [(f"{stack}/layer_norm/scale", f"{stack}.layer_norm.weight", _same, _same),
                    (f"{stack}/layer_norm/bias", f"{stack}.layer_norm.bias", _same, _same)]
    return entries


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _expected_shapes(config: BartConfig) -> dict[str, tuple[int, ...]]:
    import jax

    from bart_jax.model import init_params
    shapes = jax.eval_shape(lambda: init_params(config))
    return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)], axis=0)


# --------------------------------------------------------------------------- HF state dict <-> params
def hf_state_dict_to_params(config: BartConfig, state: dict[str, np.ndarray], source: str = "checkpoint"):
    """Hugging Face-named tensors (with or without the `model.` prefix) -> bart_jax params (numpy, float32).

    Raises CheckpointError listing every missing, unexpected or wrongly shaped tensor.
    """
    state = {k: v for k, v in state.items() if not k.endswith(_JUNK_SUFFIXES)}
    if any(k.startswith("model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    used: set[str] = set()
    problems: list[str] = []
    flat: dict[str, np.ndarray] = {}

    def take(name):
        used.add(name)
        return np.asarray(state[name], dtype=np.float32)

    # The shared embedding may live under any of its tied names.
    emb_names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    present = [n for n in emb_names if n in state]
    if not present:
        problems.append("missing the token embedding (none of " + ", ".join(emb_names) + ")")
    else:
        emb = take(present[0])
        for n in present[1:]:
            used.add(n)
        if config.tie_word_embeddings:
            flat["shared/embedding"] = emb
        else:
            enc_names = [n for n in emb_names[:3] if n in state]
            flat["shared/embedding"] = take(enc_names[0]) if enc_names else emb
            if "lm_head.weight" in state:
                flat["lm_head"] = take("lm_head.weight")
            else:
                problems.append("missing lm_head.weight (tie_word_embeddings=False)")
    if "final_logits_bias" in state:
        flat["final_logits_bias"] = take("final_logits_bias").reshape(-1)
    else:  # absent in BartModel checkpoints: zeros, as Hugging Face does
        flat["final_logits_bias"] = np.zeros((config.vocab_size,), np.float32)

    expected = _expected_shapes(config)

    def convert(name, to_ours, want):
        """One tensor in our layout, or None with the problem recorded."""
        if name not in state:
            problems.append(f"missing {name}")
            return None
        try:
            value = to_ours(take(name))
        except ValueError:
            value = None
        if value is None or value.shape != want:
            problems.append(f"{name}: shape {tuple(state[name].shape)} does not fit the config "
                            f"(expected {want} in bart_jax layout)")
            return None
        return value

    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for ours, hf, to_ours, _ in _stack_entries(config, stack):
            value = convert(hf, to_ours, expected[ours])
            if value is not None:
                flat[ours] = value
        for ours, hf, to_ours, _ in _layer_entries(config, stack):
            key = f"{stack}/layers/{ours}"
            per_layer = [convert(f"{stack}.layers.{i}.{hf}", to_ours, expected[key][1:]) for i in range(n_layers)]
            if all(p is not None for p in per_layer):
                flat[key] = np.stack(per_layer)

    unexpected = sorted(set(state) - used)
    problems += [f"unexpected {n}" for n in unexpected]
    for key in ("shared/embedding", "lm_head", "final_logits_bias"):
        if key in flat:
            want = expected[key][0]
            if flat[key].shape[0] == config.vocab_size:
                flat[key] = _pad_rows(flat[key], want)
    for key, shape in expected.items():
        if key in flat and flat[key].shape != shape:
            problems.append(f"{key}: shape {flat[key].shape}, expected {shape} for this config")
    if problems:
        raise CheckpointError(f"{source} does not match the configured BART architecture:\n  "
                              + "\n  ".join(problems))
    return _unflatten(flat)


def params_to_hf_state_dict(config: BartConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """bart_jax params (or any tree like them, e.g. gradients) -> Hugging Face
    `BartForConditionalGeneration` tensors (`dtype`, logical vocab)."""
    flat = {k: np.asarray(v, dtype=dtype) for k, v in _flatten(params).items()}
    vocab = config.vocab_size
    out = {"model.shared.weight": flat["shared/embedding"][:vocab],
           "final_logits_bias": flat["final_logits_bias"][:vocab][None, :]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = flat["lm_head"][:vocab]
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for ours, hf, _, to_hf in _stack_entries(config, stack):
            out[f"model.{hf}"] = to_hf(flat[ours])
        for ours, hf, _, to_hf in _layer_entries(config, stack):
            stacked = flat[f"{stack}/layers/{ours}"]
            for i in range(n_layers):
                out[f"model.{stack}.layers.{i}.{hf}"] = np.ascontiguousarray(to_hf(stacked[i]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- file readers
# Element types of torch's typed storages, for reading checkpoints without torch.
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _TorchStub:
    """Stands in for pickled classes we do not need (optimizer state, omegaconf nodes, ...)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _TorchStub(*args)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 with numpy: a strided view of a flat storage, copied."""
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(st * itemsize for st in stride))
    return np.array(view)


def _read_torch_zip(path):
    """Unpickle a zip-format torch.save file (torch >= 1.6) into numpy arrays, without torch."""
    import pickle
    import zipfile

    import ml_dtypes

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl")), None)
        if pkl is None:
            raise CheckpointError(f"{path}: zip archive without data.pkl; not a torch checkpoint")
        root = pkl[: -len("data.pkl")]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                    return _rebuild_tensor
                if module == "torch" and name in _TORCH_STORAGE_DTYPES:
                    return name
                if (module, name) in (("collections", "OrderedDict"), ("argparse", "Namespace"),
                                      ("builtins", "set"), ("builtins", "slice")):
                    return super().find_class(module, name)
                return _TorchStub

            def persistent_load(self, pid):
                _, storage_type, key, _, _ = pid
                dtype = _TORCH_STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
                if dtype is None:
                    raise CheckpointError(f"{path}: unsupported tensor storage {storage_type!r}")
                dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
                return np.frombuffer(zf.read(f"{root}data/{key}"), dtype=dtype)

        return Unpickler(zf.open(pkl)).load()


def _torch_load(path):
    """Read a torch.save file. Zip-format files (torch >= 1.6) need no torch; legacy ones do."""
    import zipfile
    if zipfile.is_zipfile(path):
        try:
            return _read_torch_zip(path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from e
    with open(path, "rb") as f:
        head = f.read(2)
    # A legacy torch.save file is a pickle (protocol 2+ starts with the PROTO opcode 0x80); anything else
    # is not a PyTorch checkpoint at all, and asking for torch would send the user the wrong way.
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                              "the file is corrupt or of another format")
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: this is a legacy (pre-1.6, non-zip) PyTorch checkpoint, which needs torch to read, and "
            "torch is not installed. Install a CPU build of torch, or re-save it with a recent torch.") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _tensors(state) -> dict[str, np.ndarray]:
    """The array entries of a loaded state dict as float32 numpy (torch tensors converted if present)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            out[k] = v.astype(np.float32)
        elif type(v).__module__.startswith("torch"):
            out[k] = v.detach().float().cpu().numpy()
    return out


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32 numpy (bf16/fp16 upcast), without torch."""
    from safetensors import SafetensorError, safe_open
    try:
        out = {}
        # The flax framework reads bf16 too (numpy has no bfloat16).
        with safe_open(os.fspath(path), framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def _read_hf_state(directory) -> tuple[dict[str, np.ndarray], str]:
    st = os.path.join(directory, HF_WEIGHTS)
    index = os.path.join(directory, HF_INDEX)
    binf = os.path.join(directory, HF_TORCH)
    if os.path.exists(st):
        return read_safetensors(st), st
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(read_safetensors(os.path.join(directory, name)))
        return state, index
    if os.path.exists(binf):
        return _tensors(_torch_load(binf)), binf
    raise CheckpointError(f"{directory}: no {HF_WEIGHTS}, {HF_INDEX} or {HF_TORCH} found")


def _fairseq_config(ckpt, state, path, overrides) -> BartConfig:
    args = ckpt.get("args")
    if args is None and ckpt.get("cfg") is not None:
        cfg = ckpt["cfg"]
        args = cfg["model"] if isinstance(cfg, dict) or hasattr(cfg, "__getitem__") else cfg.model
    if args is None:
        raise CheckpointError(f"{path}: fairseq checkpoint has neither 'args' nor 'cfg' describing the model")
    get = (lambda k, d=None: args.get(k, d)) if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    emb = state.get("encoder.embed_tokens.weight", state.get("decoder.embed_tokens.weight"))
    if emb is None:
        raise CheckpointError(f"{path}: fairseq checkpoint has no encoder.embed_tokens.weight")
    pos = state["encoder.embed_positions.weight"].shape[0] - 2
    normalize_before = bool(get("encoder_normalize_before", False))
    kw = dict(
        vocab_size=int(emb.shape[0]), d_model=int(get("encoder_embed_dim")),
        encoder_layers=int(get("encoder_layers")), decoder_layers=int(get("decoder_layers")),
        encoder_attention_heads=int(get("encoder_attention_heads")),
        decoder_attention_heads=int(get("decoder_attention_heads")),
        encoder_ffn_dim=int(get("encoder_ffn_embed_dim")), decoder_ffn_dim=int(get("decoder_ffn_embed_dim")),
        max_position_embeddings=int(pos),
        dropout=float(get("dropout", 0.1)), attention_dropout=float(get("attention_dropout", 0.0)),
        activation_dropout=float(get("activation_dropout", get("relu_dropout", 0.0)) or 0.0),
        activation_function=str(get("activation_fn", "gelu")),
        scale_embedding=not bool(get("no_scale_embedding", True)),
        normalize_before=normalize_before, add_final_layer_norm=normalize_before,
    )
    kw.update(overrides)
    return BartConfig(**kw)


def _read_fairseq(path, overrides):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (expected a dict with a 'model' entry)")
    state = _tensors(ckpt["model"])
    if "decoder.output_projection.weight" in state:
        state["lm_head.weight"] = state.pop("decoder.output_projection.weight")
    config = _fairseq_config(ckpt, state, path, overrides)
    return config, state


# --------------------------------------------------------------------------- public API
_RENAME_EXCHANGE = 2  # linux/fs.h


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

    target = os.path.abspath(target)
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
    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in _flatten(params).items()}

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
    expected = _expected_shapes(config)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(flat))]
    problems += [f"unexpected {k}" for k in sorted(set(flat) - set(expected))]
    problems += [f"{k}: shape {flat[k].shape}, expected {s}" for k, s in expected.items()
                 if k in flat and flat[k].shape != s]
    if problems:
        raise CheckpointError(f"{directory} does not match its config:\n  " + "\n  ".join(problems))
    return config, _to_jax(_unflatten(flat), config)


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
        state, source = _read_hf_state(path)
    else:
        source = path if os.path.isfile(path) else os.path.join(path, "model.pt")
        config, state = _read_fairseq(source, config_overrides)
    return config, _to_jax(hf_state_dict_to_params(config, state, source), config)


# --------------------------------------------------------------------------- CLI
# Tokenizer files a model directory may carry; `convert` copies them along with the weights.
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "sentencepiece.bpe.model")


def is_model_dir(path: str) -> bool:
    """A directory holding only files, one of them a model config (what `--overwrite` may replace)."""
    if not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return (any(n in entries for n in (NATIVE_CONFIG, HF_CONFIG))
            and not any(os.path.isdir(os.path.join(path, n)) for n in entries))


def _tokenizer_files(source: str) -> list[str]:
    if not os.path.isdir(source):
        return []
    return [os.path.join(source, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]


def _check_output_dir(source: str, output: str, overwrite: bool) -> None:
    """Refuse to write where something of the user's would be lost (checked before any loading)."""
    from bart_jax.errors import UserError, check_writable_dir

    src = os.path.realpath(source)
    out = os.path.realpath(output)
    if out == src or (os.path.isfile(src) and out == os.path.dirname(src)):
        raise UserError(f"output {output} is the source checkpoint; write to another directory")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UserError(f"output {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output):
        if not is_model_dir(output):
            raise UserError(f"output {output} is not empty and does not hold a model; refusing to replace it "
                            "(choose a new or empty directory)")
        if not overwrite:
            raise UserError(f"output {output} already holds a model; pass --overwrite to replace it")
    check_writable_dir(os.path.dirname(os.path.abspath(output)), "output")
def cli_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="bart-jax convert",
        description="Convert BART checkpoints. Reads Hugging Face dirs, fairseq .pt and bart_jax dirs.")
    parser.add_argument("source", help="checkpoint to read (HF directory, fairseq model.pt, or bart_jax directory)")
    parser.add_argument("output", help="directory to write")
    parser.add_argument("--to", choices=("bart_jax", "hf"), default="bart_jax",
                        help="output format (default: bart_jax)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it already holds a model (never any other directory)")
    args = parser.parse_args(argv)
    _check_output_dir(args.source, args.output, args.overwrite)
    config, params = from_pretrained(args.source)
    tokenizer_files = _tokenizer_files(args.source)

    def copy_tokenizer(tmp):
        import shutil

        for path in tokenizer_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))

    (save_model if args.to == "bart_jax" else save_pretrained)(args.output, config, params, extra=copy_tokenizer)
    from bart_jax.model import param_count
    print(f"wrote {args.to} checkpoint to {args.output} ({param_count(params):,} parameters, "
          f"vocab {config.vocab_size}, d_model {config.d_model}, "
          f"{config.encoder_layers}+{config.decoder_layers} layers)")
    return 0
