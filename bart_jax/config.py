"""The one architecture configuration of bart_jax: a frozen dataclass passed down to every module."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu", "swish", "tanh")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# float64 (with jax_enable_x64) exists for verifying exactness against float64 references.
# Memory layouts of the decoding cache's keys/values, named by their axes (b batch, n heads, h head size,
# s positions): "bnhs" is what XLA's CPU matmuls read in place, "bsnh" the projections' own layout; "auto"
# is "bnhs" for a program compiled for CPU and "bsnh" otherwise (see `decode_layout_for`).
DECODE_LAYOUTS = ("auto", "bnhs", "bsnh")
# Values that older configs (a saved bart_config.json, a run's stored config) hold, and what they now are.
RENAMED_VALUES = {"decode_layout": {"cpu": "bnhs", "plain": "bsnh"}}
ATTENTION_IMPLEMENTATIONS = (None, "explicit", "xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Everything the BART architecture needs. Hashable, so it can be a static jit argument.

    `vocab_size` is the logical vocabulary (what checkpoints hold); the embedding table is padded up to
    a multiple of `pad_vocab_to_multiple_of` so it shards evenly over the tensor axis, and logits are
    returned for the logical vocabulary only.
    """

    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    init_std: float = 0.02
    scale_embedding: bool = False
    # Pre-LN variant (NVIDIA's / mBART's): LayerNorm before each sub-layer and a final LayerNorm per stack.
    normalize_before: bool = False
    add_final_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    pad_vocab_to_multiple_of: int = 1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True  # False unrolls the same scanned layer code (same parameter layout)
    # Full (not cached) attention: "explicit" (written out), "xla"/"cudnn" (jax.nn.dot_product_attention),
    # or None: "explicit" in a program compiled for CPU, jax.nn.dot_product_attention's own choice otherwise.
    attention_implementation: str | None = None
    decode_layout: str = "auto"  # one of DECODE_LAYOUTS (the same model and results in each)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"BartConfig.{field}={getattr(self, field)!r}: {why}")

        for field, renamed in RENAMED_VALUES.items():
            value = getattr(self, field)
            if isinstance(value, str) and value in renamed:
                object.__setattr__(self, field, renamed[value])

        for f in ("vocab_size", "d_model", "encoder_attention_heads", "decoder_attention_heads",
                  "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "pad_vocab_to_multiple_of"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, "must be a positive integer")
        for f in ("encoder_layers", "decoder_layers"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, "must be an integer >= 1")
        for f in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, f):
                bad(f, f"d_model={self.d_model} is not divisible by the number of heads")
        for f in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, f)
            if not (0.0 <= v < 1.0):
                bad(f, "must be in [0, 1)")
        if self.activation_function not in ACTIVATIONS:
            bad("activation_function", f"unknown activation; expected one of {ACTIVATIONS}")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"expected one of {REMAT_POLICIES}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"expected one of {tuple(DTYPES)}")
        if self.layer_norm_eps <= 0:
            bad("layer_norm_eps", "must be positive")
        if self.decode_layout not in DECODE_LAYOUTS:
            bad("decode_layout", f"expected one of {DECODE_LAYOUTS}")
        if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            bad("attention_implementation", f"expected one of {ATTENTION_IMPLEMENTATIONS}")
        for f in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, f)
            if not isinstance(v, int) or not (0 <= v < self.vocab_size):
                bad(f, f"must be a token id in [0, vocab_size={self.vocab_size})")

    # ----------------------------------------------------------------- derived
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple_of
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def decode_layout_for(self, platform: str | None = None) -> str:
        """The decoding cache's layout in a program compiled for `platform` ('cpu', 'gpu', 'cuda', 'rocm',
        'tpu'): "bnhs" or "bsnh". "auto" resolves by `platform`; None stands for jax's default device, where a
        program runs whose inputs are not committed elsewhere (`generate` passes its parameters' platform)."""
        if self.decode_layout != "auto":
            return self.decode_layout
        return "bnhs" if (platform or jax.default_backend()) == "cpu" else "bsnh"

    def for_platform(self, platform: str) -> "BartConfig":
        """This config with "auto" choices that change shapes (the decoding cache's layout) fixed for a
        program compiled for `platform`. (Same-shape choices, such as the full-attention path, are made
        at lowering: see `attention_implementation_for`.)"""
        return self.replace(decode_layout=self.decode_layout_for(platform))

    def attention_implementation_for(self, platform: str) -> str:
        """The full-attention path in a program compiled for `platform`: "explicit", "xla", "cudnn", or "auto"
        (jax.nn.dot_product_attention picks). None resolves to "explicit" on CPU, where the written-out
        head-major form measured faster (bench/RESULTS.md), and "auto" elsewhere."""
        if self.attention_implementation is not None:
            return self.attention_implementation
        return "explicit" if platform == "cpu" else "auto"

    def replace(self, **changes) -> "BartConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BartConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown BartConfig field(s): {unknown}")
        return cls(**d)

    # ------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "BartConfig":
        """Build from a Hugging Face BART/mBART `config.json` (a dict or a path to the file or its directory)."""
        where = "config.json"
        if not isinstance(hf, dict):
            path = where = os.fspath(hf)
            if os.path.isdir(path):
                path = where = os.path.join(path, "config.json")
            with open(path) as f:
                try:
                    hf = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from e
        model_type = hf.get("model_type", "bart")
        if model_type not in ("bart", "mbart"):
            raise ValueError(f"{where}: model_type={model_type!r} is not BART; only 'bart' and 'mbart' "
                             "checkpoints are supported")
        pre_ln = model_type == "mbart" or bool(hf.get("normalize_before", False))
        kw = dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            encoder_layers=hf["encoder_layers"],
            decoder_layers=hf["decoder_layers"],
            encoder_attention_heads=hf["encoder_attention_heads"],
            decoder_attention_heads=hf["decoder_attention_heads"],
            encoder_ffn_dim=hf["encoder_ffn_dim"],
            decoder_ffn_dim=hf["decoder_ffn_dim"],
            max_position_embeddings=hf["max_position_embeddings"],
            dropout=float(hf.get("dropout", 0.1)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            activation_dropout=float(hf.get("activation_dropout", 0.0)),
            activation_function=hf.get("activation_function", "gelu"),
            init_std=float(hf.get("init_std", 0.02)),
            scale_embedding=bool(hf.get("scale_embedding", False)),
            normalize_before=pre_ln,
            add_final_layer_norm=pre_ln or bool(hf.get("add_final_layer_norm", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            pad_token_id=hf.get("pad_token_id", 1),
            bos_token_id=hf.get("bos_token_id", 0),
            eos_token_id=hf.get("eos_token_id", 2),
            decoder_start_token_id=hf.get("decoder_start_token_id", 2),
            forced_bos_token_id=hf.get("forced_bos_token_id"),
            forced_eos_token_id=hf.get("forced_eos_token_id", 2),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for this architecture."""
        mbart = self.normalize_before
        return {
            "architectures": ["MBartForConditionalGeneration" if mbart else "BartForConditionalGeneration"],
            "model_type": "mbart" if mbart else "bart",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "decoder_attention_heads": self.decoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "activation_dropout": self.activation_dropout,
            "activation_function": self.activation_function,
            "init_std": self.init_std,
            "scale_embedding": self.scale_embedding,
            "normalize_before": self.normalize_before,
            "add_final_layer_norm": self.add_final_layer_norm,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "forced_bos_token_id": self.forced_bos_token_id,
            "forced_eos_token_id": self.forced_eos_token_id,
            "is_encoder_decoder": True,
            "use_cache": True,
        }


_PRESETS: dict[str, dict[str, Any]] = {
    # facebook/bart-base
    "bart-base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    # facebook/bart-large
    "bart-large": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                       decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    # A CPU-sized model for tests.
    "tiny": dict(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                 max_position_embeddings=128),
    # The main job's model (configs/tiny.yaml; chosen by the sweep in bench/RESULTS.md, "Main-job recipe").
    "small": dict(vocab_size=4096, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
                  max_position_embeddings=128),
}


def preset(name: str, **overrides) -> BartConfig:
    """A named architecture: 'bart-base', 'bart-large', 'small' or 'tiny', with field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
    return BartConfig(**{**_PRESETS[name], **overrides})
