"""Reading checkpoint files without torch: zip-format torch.save files (torch >= 1.6) are unpickled with
numpy, safetensors read with the flax framework; only legacy pre-1.6 pickles need torch, and say so when it
is missing. Hugging Face directories and fairseq `model.pt` files come out as HF-named float32 tensors."""

from __future__ import annotations

import json
import os

import numpy as np

from bart_jax.config import BartConfig
from bart_jax.convert.layout import CheckpointError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TORCH = "pytorch_model.bin"

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


def read_hf_state(directory) -> tuple[dict[str, np.ndarray], str]:
    """(HF-named float32 tensors, the file they came from) of a Hugging Face model directory."""
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


def read_fairseq(path, overrides) -> tuple[BartConfig, dict[str, np.ndarray]]:
    """(BartConfig from the checkpoint's args/cfg with `overrides`, HF-named float32 tensors) of a fairseq
    model.pt."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (expected a dict with a 'model' entry)")
    state = _tensors(ckpt["model"])
    if "decoder.output_projection.weight" in state:
        state["lm_head.weight"] = state.pop("decoder.output_projection.weight")
    config = _fairseq_config(ckpt, state, path, overrides)
    return config, state
