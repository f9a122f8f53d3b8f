"""Exactness against Hugging Face / fairseq reference fixtures, and checkpoint round trips and errors."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from bart_jax import Bart, from_pretrained, save_pretrained
from bart_jax.convert import (CheckpointError, hf_state_dict_to_params, load_model, params_to_hf_state_dict,
                              read_safetensors, save_model)
from bart_jax.model import param_count

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PARITY_CASES = {
    "bart_default": "bart_default",  # post-LN, safetensors
    "bart_scaled": "bart_scaled",  # scale_embedding=True, odd vocab, pytorch_model.bin
    "mbart_preln": "mbart_preln",  # Pre-LN variant with final LayerNorms
    "bart_model_noprefix": "bart_model_noprefix",  # BartModel: no `model.` prefix, no final_logits_bias
    "fairseq": "fairseq_bart/model.pt",  # fairseq names, junk keys, output_projection
}


def reference(name):
    folder = "fairseq_bart" if name == "fairseq" else name
    return dict(np.load(os.path.join(FIXTURES, folder, "reference.npz")))


def _forward(config, params, ref):
    model = Bart(config)
    enc = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"], method="encode")
    logits = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"],
                         ref["decoder_attention_mask"])
    return enc, logits


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_logits_match_reference_float32(name):
    config, params = from_pretrained(os.path.join(FIXTURES, PARITY_CASES[name]))
    ref = reference(name)
    enc, logits = _forward(config, params, ref)
    chex.assert_type(logits, np.float32)
    np.testing.assert_allclose(enc, ref["encoder_last_hidden_state"], atol=1e-5, rtol=0)
    # Against the float64 reference: our float32 error may be at most twice Hugging Face's own float32
    # error on the same inputs. A fixed 1e-5 bar between two float32 implementations is below float32
    # resolution here (logits reach ~13; HF's float32 logits are 1.04e-5 off its float64 ones on
    # bart_default) and flips with the CPU's matmul kernels (AVX-512 vs AVX2); the float64 test below is
    # the strict proof.
    ours_error = np.max(np.abs(logits - ref["logits_f64"]))
    hf_error = np.max(np.abs(ref["logits"] - ref["logits_f64"]))
    assert ours_error <= 2 * hf_error, (ours_error, hf_error)


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_logits_match_reference_float64(name):
    """Exactness beyond float32 noise: the same computation in float64 agrees to ~1e-12."""
    with jax.enable_x64(True):
        config, params = from_pretrained(os.path.join(FIXTURES, PARITY_CASES[name]))
        config = config.replace(dtype="float64", param_dtype="float64")
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        ref = reference(name)
        enc, logits = _forward(config, params, ref)
        assert logits.dtype == np.float64
        np.testing.assert_allclose(enc, ref["encoder_last_hidden_state_f64"], atol=1e-9, rtol=0)
        np.testing.assert_allclose(logits, ref["logits_f64"], atol=1e-9, rtol=0)


def test_fairseq_and_hf_give_the_same_parameters():
    _, hf = from_pretrained(os.path.join(FIXTURES, "bart_default"))
    _, fs = from_pretrained(os.path.join(FIXTURES, "fairseq_bart", "model.pt"))
    # fairseq has no output bias: it loads as zeros; every other tensor is the same
    assert not np.any(fs.pop("final_logits_bias"))
    hf.pop("final_logits_bias")
    chex.assert_trees_all_equal(hf, fs)


def test_config_traits_are_read():
    scaled, _ = from_pretrained(os.path.join(FIXTURES, "bart_scaled"))
    assert scaled.scale_embedding
    mbart, _ = from_pretrained(os.path.join(FIXTURES, "mbart_preln"))
    assert mbart.normalize_before and mbart.add_final_layer_norm


def test_hf_round_trip_is_lossless(tmp_path):
    src = os.path.join(FIXTURES, "bart_default")
    config, params = from_pretrained(src)
    save_pretrained(tmp_path / "hf", config, params)
    original = read_safetensors(os.path.join(src, "model.safetensors"))
    written = read_safetensors(tmp_path / "hf" / "model.safetensors")
    for name, value in written.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    config2, params2 = from_pretrained(tmp_path / "hf")
    assert config2 == config
    chex.assert_trees_all_equal(params, params2)


def test_native_round_trip_and_padded_vocab(tmp_path):
    config, params = from_pretrained(os.path.join(FIXTURES, "bart_scaled"), pad_vocab_to_multiple_of=64)
    assert params["shared"]["embedding"].shape[0] == 128 and config.vocab_size == 101
    save_model(tmp_path / "m", config, params)
    config2, params2 = load_model(tmp_path / "m")
    assert config2 == config
    chex.assert_trees_all_equal(params, params2)
    # exporting drops the padding rows again
    state = params_to_hf_state_dict(config, params)
    assert state["model.shared.weight"].shape[0] == 101


def test_export_loads_in_bart_jax_with_same_logits(tmp_path):
    config, params = from_pretrained(os.path.join(FIXTURES, "mbart_preln"))
    save_pretrained(tmp_path / "out", config, params)
    hf_cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert hf_cfg["model_type"] == "mbart"
    ref = reference("mbart_preln")
    _, params2 = from_pretrained(tmp_path / "out")
    a = Bart(config).apply({"params": params}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    b = Bart(config).apply({"params": params2}, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"])
    np.testing.assert_array_equal(a, b)


def _hf_state():
    return read_safetensors(os.path.join(FIXTURES, "bart_default", "model.safetensors"))


def test_shared_embedding_from_any_tied_name():
    config, params = from_pretrained(os.path.join(FIXTURES, "bart_default"))
    state = _hf_state()
    emb = state["model.shared.weight"]
    for name in ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        state.pop(name, None)
    state["lm_head.weight"] = emb
    restored = hf_state_dict_to_params(config, state)
    np.testing.assert_array_equal(restored["shared"]["embedding"], params["shared"]["embedding"])


def test_missing_final_logits_bias_is_zeros():
    config, _ = from_pretrained(os.path.join(FIXTURES, "bart_default"))
    state = _hf_state()
    del state["final_logits_bias"]
    params = hf_state_dict_to_params(config, state)
    assert not np.any(params["final_logits_bias"])


def test_mismatches_are_listed_not_silently_loaded():
    config, _ = from_pretrained(os.path.join(FIXTURES, "bart_default"))
    state = _hf_state()
    del state["model.decoder.layers.1.fc2.bias"]
    state["model.encoder.layers.0.fc1.weight"] = state["model.encoder.layers.0.fc1.weight"][:-1]
    state["model.decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        hf_state_dict_to_params(config, state, "ckpt")
    msg = str(err.value)
    assert "missing decoder.layers.1.fc2.bias" in msg
    assert "unexpected decoder.extra.weight" in msg
    assert "encoder/layers/ffn/fc1/kernel" in msg or "encoder.layers.0.fc1.weight" in msg


def test_wrong_architecture_is_a_clear_error():
    config, _ = from_pretrained(os.path.join(FIXTURES, "bart_default"))
    with pytest.raises(CheckpointError, match="shape"):
        hf_state_dict_to_params(config.replace(d_model=64), _hf_state())
    with pytest.raises(CheckpointError, match="missing encoder.layers.2"):
        hf_state_dict_to_params(config.replace(encoder_layers=3), _hf_state())


def test_corrupt_files_are_clear_errors(tmp_path):
    src = os.path.join(FIXTURES, "bart_default")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        from_pretrained(bad)
    pt = tmp_path / "model.pt"
    pt.write_bytes(open(os.path.join(FIXTURES, "fairseq_bart", "model.pt"), "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="model.pt"):
        from_pretrained(pt)
    with pytest.raises(CheckpointError, match="no such"):
        from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a Hugging Face"):
        from_pretrained(empty)


def test_convert_cli(tmp_path, capsys):
    from bart_jax.cli import main
    assert main(["convert", os.path.join(FIXTURES, "fairseq_bart", "model.pt"), str(tmp_path / "j")]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "j"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    _, a = from_pretrained(tmp_path / "hf")
    _, b = from_pretrained(os.path.join(FIXTURES, "fairseq_bart", "model.pt"))
    chex.assert_trees_all_equal(a, b)
    assert param_count(a) > 0
