"""Checkpoints in and out: Hugging Face BART/mBART directories, fairseq `model.pt`, and bart_jax's own format.

- `from_pretrained(path)` -> (BartConfig, params) for a Hugging Face directory (config.json with
  model.safetensors, a sharded safetensors index, or pytorch_model.bin), a fairseq checkpoint (model.pt),
  or a bart_jax model directory (bart_config.json + params.safetensors).
- `save_pretrained(dir, config, params)` writes a Hugging Face directory (config.json + model.safetensors).
- `save_model` / `load_model` write and read bart_jax's own directory.
No format needs torch (see `readers`). Every mismatch (missing, unexpected or wrongly shaped tensors) is one
error listing all the offending names.

Modules: `layout` (HF names and layouts <-> bart_jax parameter trees), `readers` (checkpoint files without
torch), `checkpoints` (model directories, `from_pretrained`). The `bart-jax convert` command is in
bart_jax.cli.convert.
"""

from bart_jax.convert.checkpoints import (
    NATIVE_CONFIG,
    NATIVE_WEIGHTS,
    detect_format,
    from_pretrained,
    load_model,
    save_model,
    save_pretrained,
)
from bart_jax.convert.layout import CheckpointError, hf_state_dict_to_params, params_to_hf_state_dict
from bart_jax.convert.readers import HF_CONFIG, HF_INDEX, HF_TORCH, HF_WEIGHTS, read_safetensors

__all__ = ["CheckpointError", "HF_CONFIG", "HF_INDEX", "HF_TORCH", "HF_WEIGHTS", "NATIVE_CONFIG", "NATIVE_WEIGHTS",
           "detect_format", "from_pretrained", "hf_state_dict_to_params", "load_model", "params_to_hf_state_dict",
           "read_safetensors", "save_model", "save_pretrained"]
