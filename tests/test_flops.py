"""The one FLOP counter and the one per-device peak behind every MFU figure (train loop meter, bench scripts)."""

import types

import jax
import jax.numpy as jnp
import pytest

from bart_jax import Bart, init_params, preset
from bart_jax.train import flops


def test_forward_flops_match_xla_cost_analysis():
    """The hand count of matmul FLOPs agrees with XLA's own count of the compiled forward (layers unrolled,
    since XLA counts a loop body once); XLA's is a little higher as it also counts elementwise work."""
    cfg = preset("tiny", d_model=256, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=1000, dropout=0.0,
                 scan_layers=False)
    params = jax.eval_shape(lambda: init_params(cfg))
    batch, source, target = 2, 32, 16
    ids = jax.ShapeDtypeStruct((batch, source), jnp.int32)
    dec = jax.ShapeDtypeStruct((batch, target), jnp.int32)

    def forward(p, i, d):
        return Bart(cfg).apply({"params": p}, i, jnp.ones_like(i), d)

    xla = jax.jit(forward).lower(params, ids, dec).cost_analysis()["flops"]
    counted = flops.forward_flops(cfg, batch, source, target)
    assert 0.9 * xla < counted <= xla
    assert flops.train_step_flops(cfg, batch, source, target) == 3 * counted


@pytest.mark.parametrize("kind,expect", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
])
def test_datasheet_peaks_by_device_kind(kind, expect):
    assert flops.datasheet_peaks(kind)["bfloat16"] == expect


def test_listed_gpu_uses_its_datasheet_figure_per_dtype():
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    peak = flops.device_peak(jnp.bfloat16, h100)
    assert peak.flops_per_s == pytest.approx(989.4e12)
    assert peak.source == "datasheet NVIDIA H100 80GB HBM3 bfloat16 dense"
    # float32 matmuls run on TF32 tensor cores at JAX's default precision, on CUDA cores at 'highest'.
    assert flops.device_peak(jnp.float32, h100).flops_per_s == pytest.approx(494.7e12)
    with jax.default_matmul_precision("highest"):
        assert flops.device_peak(jnp.float32, h100).flops_per_s == pytest.approx(66.9e12)


def test_cpu_and_unlisted_devices_use_a_measured_matmul_labelled_as_such():
    assert flops.datasheet_peaks("NVIDIA GeForce RTX 3090") is None
    peak = flops.device_peak(jnp.float32)
    assert jax.devices()[0].platform == "cpu"
    assert peak.source == flops.MEASURED == "measured matmul" and peak.flops_per_s > 1e8
    assert flops.device_peak(jnp.float32) == peak  # measured once per process
