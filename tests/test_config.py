"""The run config on OmegaConf: BartConfig / NoiseConfig fields embedded in the model / noise sections
(unset stays apart from set-to-the-default), and one-line errors that name the file or override and the key."""

import dataclasses

import pytest

from bart_jax.config import BartConfig
from bart_jax.noise import NoiseConfig
from bart_jax.train import config as C


def test_model_and_noise_sections_embed_every_field():
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert names(C.ModelSection) == names(BartConfig) | {"preset"}
    assert names(C.NoiseSection) == names(NoiseConfig) | {"preset"}
    cfg = C.load_config("tiny", ["model.remat_policy=dots", "model.encoder_ffn_dim=256", "noise.mask_ratio=0.2"])
    assert cfg.model.encoder_ffn_dim == 256 and cfg.model.remat_policy == "dots"  # fields, not (name, value) pairs
    assert cfg.model.bart_config().d_model == 128  # from the preset tiny.yaml names
    assert cfg.noise.mask_ratio == 0.2 and cfg.noise.noise_config().mask_ratio == 0.2
    # A field the config leaves unset comes from the preset (or a checkpoint), so it is not an override.
    assert "max_position_embeddings" not in cfg.model.overrides
    assert cfg.model.bart_config().max_position_embeddings == 128


def test_null_is_a_value_not_unset():
    cfg = C.load_config("tiny", ["model.forced_eos_token_id=null", "noise.sentence_end_ids=[5, 6]"])
    assert cfg.model.overrides["forced_eos_token_id"] is None  # BartConfig's default is 2
    assert cfg.model.bart_config().forced_eos_token_id is None
    assert cfg.noise.noise_config().sentence_end_ids == (5, 6)  # a tuple, as NoiseConfig wants
    assert C.RunConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_errors_name_the_file_and_the_key(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("pretrain:\n  train:\n    steps: abc\n")
    with pytest.raises(ValueError, match=r"run\.yaml: pretrain\.train\.steps='abc': expected an integer$"):
        C.load_config(p)
    p.write_text("checkpoint: {async_save: 1}\n")
    with pytest.raises(ValueError, match=r"run\.yaml: checkpoint\.async_save=1: expected true/false$"):
        C.load_config(p)
    p.write_text("variants:\n  v:\n    pretrain.train.stepz: 3\n")
    with pytest.raises(ValueError, match=r"run\.yaml variant 'v': unknown config key 'pretrain\.train\.stepz'"):
        C.load_config(p, variant="v")
    p.write_text("model: {preset: tiny\n")
    with pytest.raises(ValueError, match=r"run\.yaml: invalid YAML"):
        C.load_config(p)


def test_overrides_apply_in_order_and_stage_defaults_survive():
    cfg = C.load_config(None, ["finetune.train.steps=3", "finetune.train.steps=4", "workdir=7"])
    assert cfg.finetune.train.steps == 4 and cfg.workdir == "7"
    assert cfg.finetune.optimizer.name == "adamw" and cfg.finetune.init_from == "run:pretrain"
    assert C.apply_overrides(cfg, ["model.preset=bart-base"]).model.bart_config().d_model == 768
