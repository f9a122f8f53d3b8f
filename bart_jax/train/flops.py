"""Model FLOPs of a BART train step and the per-device peak FLOP/s they are compared with (MFU).

The one FLOP counter (`train_step_flops`) of the train loop's meter and of every benchmark script; the train
loop states MFU only against a datasheet peak (`datasheet_peak`), benchmark tables also against a measured
matmul (`device_peak`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from bart_jax.config import BartConfig

# Dense (no structured sparsity) peak TFLOP/s per GPU, from NVIDIA's datasheets: "NVIDIA H100 Tensor Core
# GPU" datasheet and the Hopper architecture whitepaper (H100 SXM5 / PCIe / NVL), "NVIDIA H200 Tensor Core
# GPU" datasheet (H200 SXM / NVL), "NVIDIA A100 Tensor Core GPU" datasheet (SXM4 and PCIe alike). The
# datasheets quote tensor-core figures with sparsity; these are half of those. 'float32' is the CUDA-core
# FP32 rate, 'tf32' the tensor-core TF32 rate that XLA uses for float32 matmuls at JAX's default precision.
# Matched against `device.device_kind` in this order (more specific names first).
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIE", {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.2}),
    ("H100 NVL", {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0}),
    ("H200 NVL", {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0}),
    ("H100", {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM5
    ("H200", {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM
    ("A100", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
)
# The label of a matmul rate timed on this machine: a benchmark figure, never an MFU denominator (a busy
# machine times it low, which would overstate MFU).
MEASURED = "measured matmul"


@dataclasses.dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s for a compute dtype, and where the figure comes from (`source`: a datasheet
    entry, a configured figure, or MEASURED)."""

    flops_per_s: float
    source: str


def forward_flops(config: BartConfig, batch: int, source_length: int, target_length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over padded [batch, S] -> [batch, T].

    Counts every projection, the feed-forward layers, attention scores and mixing (full, not halved
    for the causal mask, as is conventional) and the tied LM head over the logical vocabulary.
    """
    d, S, T = config.d_model, source_length, target_length
    enc_layer = 2 * (4 * d * d + 2 * d * config.encoder_ffn_dim) * S + 2 * 2 * S * S * d
    dec_layer = (2 * (4 * d * d + 2 * d * d + 2 * d * config.decoder_ffn_dim) * T  # self qkvo, cross q/o, ffn
                 + 2 * 2 * d * d * S  # cross-attention keys/values over the encoder output
                 + 2 * 2 * T * T * d + 2 * 2 * T * S * d)  # self and cross attention scores + mixing
    head = 2 * d * config.vocab_size * T
    return float(batch) * (config.encoder_layers * enc_layer + config.decoder_layers * dec_layer + head)


def train_step_flops(config: BartConfig, batch: int, source_length: int, target_length: int) -> float:
    """Model FLOPs of a training step: forward + backward = 3 x forward (rematerialisation not counted)."""
    return 3.0 * forward_flops(config, batch, source_length, target_length)


def measure_matmul_flops(dtype=jnp.float32, size: int = 1024, seconds: float = 0.5,
                         device: jax.Device | None = None) -> float:
    """Sustained FLOP/s of a square `size` matmul in `dtype` on one device (best of repeated timings)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype), device)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < 3:
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2.0 * size ** 3 / best


def datasheet_peaks(device_kind: str) -> dict[str, float] | None:
    """{'bfloat16', 'tf32', 'float32': dense TFLOP/s} of a GPU named `device_kind`, or None if not listed."""
    kind = device_kind.upper()
    return next((peaks for name, peaks in GPU_PEAK_TFLOPS if name in kind), None)


def _datasheet_key(dtype) -> str:
    if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "bfloat16"  # the fp16 and bf16 tensor-core rates are equal on these parts
    full = jax.config.jax_default_matmul_precision in ("highest", "float32", "F32_F32_F32")
    return "float32" if full else "tf32"


@functools.lru_cache(maxsize=None)
def _measured_peak(dtype_name: str, device: jax.Device) -> float:
    return measure_matmul_flops(jnp.dtype(dtype_name), device=device)


def datasheet_peak(dtype, device: jax.Device | None = None) -> Peak | None:
    """The datasheet peak FLOP/s of one device for matmuls in compute `dtype`: a listed GPU's
    (GPU_PEAK_TFLOPS), else None (a CPU, an unlisted GPU: no peak to state an MFU against)."""
    device = device or jax.local_devices()[0]
    peaks = datasheet_peaks(device.device_kind) if device.platform == "gpu" else None
    if peaks is None:
        return None
    key = _datasheet_key(dtype)
    return Peak(peaks[key] * 1e12, f"datasheet {device.device_kind} {key} dense")


def device_peak(dtype, device: jax.Device | None = None) -> Peak:
    """The peak a benchmark table compares with: `datasheet_peak`, or on a device without one the rate of a
    matmul measured here once per process, labelled MEASURED (a bench figure, below the hardware's peak)."""
    device = device or jax.local_devices()[0]
    return datasheet_peak(dtype, device) or Peak(_measured_peak(jnp.dtype(dtype).name, device), MEASURED)
