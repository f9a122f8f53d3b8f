"""bart_jax: exact, fast, scalable BART in JAX/Flax."""

from __future__ import annotations

from bart_jax.config import BartConfig, preset
from bart_jax.lazy import lazy_getattr

__version__ = "0.1.0"

# Public names resolved lazily so `import bart_jax` stays cheap and each piece loads only when used.
_LAZY = {
    "Bart": "bart_jax.model",
    "init_params": "bart_jax.model",
    "param_logical_axes": "bart_jax.model",
    "shift_tokens_right": "bart_jax.model",
    "from_pretrained": "bart_jax.convert",
    "save_pretrained": "bart_jax.convert",
    "generate": "bart_jax.decode.generate",
    "summarize": "bart_jax.decode.generate",
}

__all__ = ["BartConfig", "preset", *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY)
