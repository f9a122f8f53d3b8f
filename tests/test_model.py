"""Model core: shapes, dtypes, gradients, scan/unrolled equality, cache path, presets, traps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax import Bart, BartConfig, init_params, param_logical_axes, preset, shift_tokens_right
from bart_jax.layers.transformer import activation
from bart_jax.model import decoder_layer_params, param_count


def tiny(**kw):
    return preset("tiny", dropout=0.0, vocab_size=97, max_position_embeddings=32, **kw)


def batch():
    ids = jnp.array([[0, 5, 6, 7, 8, 2, 1, 1], [0, 9, 10, 2, 1, 1, 1, 1]], jnp.int32)
    labels = jnp.array([[0, 5, 6, 7, 2, 1], [0, 9, 10, 11, 12, 2]], jnp.int32)
    dec = shift_tokens_right(labels, 1, 2)
    return ids, (ids != 1).astype(jnp.int32), dec, (labels != 1).astype(jnp.int32)


@pytest.fixture(scope="module")
def cfg_params():
    cfg = tiny()
    return cfg, init_params(cfg, jax.random.PRNGKey(1))


def test_shift_tokens_right():
    labels = jnp.array([[0, 5, 6, 2], [0, 7, -100, -100]])
    out = shift_tokens_right(labels, pad_token_id=1, decoder_start_token_id=2)
    np.testing.assert_array_equal(out, [[2, 0, 5, 6], [2, 0, 7, 1]])
    assert out.dtype == jnp.int32


def test_forward_shapes_and_dtype(cfg_params):
    cfg, params = cfg_params
    ids, am, dec, dm = batch()
    logits = Bart(cfg).apply({"params": params}, ids, am, dec, dm, deterministic=True)
    chex.assert_shape(logits, (2, 6, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = tiny(dtype="bfloat16")
    params = init_params(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    ids, am, dec, dm = batch()
    model = Bart(cfg)
    enc = model.apply({"params": params}, ids, am, method="encode")
    chex.assert_type(enc, jnp.bfloat16)
    logits = model.apply({"params": params}, ids, am, dec, dm)
    chex.assert_type(logits, jnp.float32)
    ref = Bart(tiny()).apply({"params": params}, ids, am, dec, dm)
    # bf16 compute stays close to fp32 on a tiny model
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_gradient_reaches_every_parameter(cfg_params):
    cfg, params = cfg_params
    ids, am, dec, dm = batch()
    model = Bart(cfg)
    # Perturb everything so no gradient is zero by symmetry (zero biases, unit LayerNorm scales).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    def loss(p):
        logits = model.apply({"params": p}, ids, am, dec, dm)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * dm)

    grads = jax.grad(loss)(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(path) for path, g in flat if not bool(jnp.any(g != 0))]
    assert not dead, f"no gradient reaches {dead}"


def test_scan_and_unrolled_are_equal(cfg_params):
    cfg, params = cfg_params
    ids, am, dec, dm = batch()
    a = Bart(cfg).apply({"params": params}, ids, am, dec, dm)
    b = Bart(cfg.replace(scan_layers=False)).apply({"params": params}, ids, am, dec, dm)
    chex.assert_trees_all_close(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing_numerically(cfg_params, policy):
    cfg, params = cfg_params
    ids, am, dec, dm = batch()

    def grads(c):
        return jax.grad(lambda p: jnp.sum(Bart(c).apply({"params": p}, ids, am, dec, dm) ** 2))(params)

    chex.assert_trees_all_close(grads(cfg), grads(cfg.replace(remat_policy=policy)), rtol=1e-4, atol=1e-4)


# The cache shapes of each decode layout for 2 inputs, 4 heads of 16, 8 source and 10 decoder positions.
CACHE_SHAPES = {"bnhs": lambda rows, length: (rows, 4, 16, length),  # [B*K, N, H, T]
                "bsnh": lambda rows, length: (rows, length, 4, 16)}  # [B*K, T, N, H]


@pytest.mark.parametrize("layout", ["bnhs", "bsnh"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("unrolled", [False, True])
def test_cached_steps_equal_full_forward(cfg_params, num_beams, unrolled, layout):
    """Both cached decoders (scan over stacked layers and cache; unrolled over per-layer weight and cache
    buffers), in both decode layouts, reproduce the teacher-forced logits position by position."""
    cfg, params = cfg_params
    cfg = cfg.replace(decode_layout=layout)
    ids, am, _, _ = batch()
    model = Bart(cfg)
    dec = jnp.array([[2, 0, 5, 6, 7, 8, 9], [2, 0, 9, 10, 11, 12, 13]], jnp.int32)
    full = model.apply({"params": params}, ids, am, dec)
    enc = model.apply({"params": params}, ids, am, method="encode")
    cache = model.apply({"params": params}, enc, am, num_beams, 10, unrolled, method="init_cache")
    layers = cfg.decoder_layers
    self_shape, cross_shape = CACHE_SHAPES[layout](2 * num_beams, 10), CACHE_SHAPES[layout](2, 8)
    if unrolled:
        assert all(len(leaf) == layers for leaf in cache.values())
        chex.assert_shape([*cache["self_k"], *cache["self_v"]], self_shape)
        chex.assert_shape([*cache["cross_k"], *cache["cross_v"]], cross_shape)  # per input, not per beam
    else:
        chex.assert_shape([cache["self_k"], cache["self_v"]], (layers, *self_shape))
        chex.assert_shape([cache["cross_k"], cache["cross_v"]], (layers, *cross_shape))
    layer_params = decoder_layer_params(cfg, params) if unrolled else None
    step = jax.jit(lambda t, i, c: model.apply({"params": params}, t, i, c, am, layer_params, method="decode_step"))
    beams = jnp.repeat(dec, num_beams, axis=0)
    for t in range(dec.shape[1]):
        logits, cache = step(beams[:, t], jnp.int32(t), cache)
        expect = jnp.repeat(full[:, t], num_beams, axis=0)
        chex.assert_trees_all_close(logits, expect, atol=2e-5)


def test_decode_layout_resolves_per_platform():
    """'auto' is the CPU-tuned layout for a program compiled for CPU only; an explicit layout holds on every
    platform."""
    cfg = tiny()
    assert cfg.decode_layout == "auto"
    assert [cfg.decode_layout_for(p) for p in ("cpu", "gpu", "cuda", "tpu")] == ["bnhs", "bsnh", "bsnh", "bsnh"]
    assert cfg.decode_layout_for() == ("bnhs" if jax.default_backend() == "cpu" else "bsnh")
    assert [cfg.for_platform(p).decode_layout for p in ("cpu", "cuda")] == ["bnhs", "bsnh"]
    for layout in ("bnhs", "bsnh"):
        assert {cfg.replace(decode_layout=layout).decode_layout_for(p) for p in ("cpu", "gpu")} == {layout}
        assert cfg.replace(decode_layout=layout).for_platform("cuda").decode_layout == layout


@pytest.mark.parametrize("layout", ["bnhs", "bsnh"])
def test_step_logits_form_follows_the_lowering_platform(cfg_params, layout):
    """Only a program lowered for CPU computes a step's logits vocabulary-major behind an optimization barrier,
    in either cache layout, whatever machine it is traced on."""
    cfg, params = cfg_params
    model = Bart(cfg.replace(decode_layout=layout))
    ids, am, _, _ = batch()
    enc = model.apply({"params": params}, ids, am, method="encode")
    cache = model.apply({"params": params}, enc, am, 1, 4, method="init_cache")
    step = jax.jit(lambda c: model.apply({"params": params}, jnp.array([2, 2]), jnp.int32(0), c, am,
                                         method="decode_step"))
    for platform in ("cpu", "cuda"):
        hlo = step.trace(cache).lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in hlo) == (platform == "cpu"), platform


def test_unrolled_step_rejects_wrong_layer_count(cfg_params):
    cfg, params = cfg_params
    ids, am, _, _ = batch()
    model = Bart(cfg)
    enc = model.apply({"params": params}, ids, am, method="encode")
    cache = model.apply({"params": params}, enc, am, 1, 4, True, method="init_cache")
    with pytest.raises(ValueError, match="layer_params has 1 layers"):
        model.apply({"params": params}, jnp.array([2, 2]), jnp.int32(0), cache, am,
                    decoder_layer_params(cfg, params)[:1], method="decode_step")


def test_attention_implementation_resolves_per_backend():
    """None is the written-out head-major form on CPU and jax.nn.dot_product_attention's choice elsewhere."""
    cfg = tiny()
    assert cfg.attention_implementation is None
    assert [cfg.attention_implementation_for(b) for b in ("cpu", "gpu", "tpu")] == ["explicit", "auto", "auto"]
    for impl in ("explicit", "xla"):
        assert {cfg.replace(attention_implementation=impl).attention_implementation_for(b)
                for b in ("cpu", "gpu")} == {impl}


def test_full_attention_path_is_chosen_for_the_lowering_platform(cfg_params):
    """With no attention_implementation set, a program lowered for CPU writes attention out and one lowered
    for CUDA (here, on a CPU-only machine) goes through jax.nn.dot_product_attention, whose einsum is
    'BTNH,BSNH->BNTS'; a set implementation holds on every platform."""
    cfg, params = cfg_params
    ids, am, dec, dm = batch()

    def lowered(config, platform):
        fn = jax.jit(lambda p: Bart(config).apply({"params": p}, ids, am, dec, dm))
        return fn.trace(params).lower(lowering_platforms=(platform,)).as_text(debug_info=True)

    for platform, explicit in (("cpu", True), ("cuda", False)):
        text = lowered(cfg, platform)
        assert ("bnth,bnsh->bnts" in text, "BTNH,BSNH->BNTS" in text) == (explicit, not explicit), platform
    assert "BTNH,BSNH->BNTS" in lowered(cfg.replace(attention_implementation="xla"), "cpu")
    assert "BTNH,BSNH->BNTS" not in lowered(cfg.replace(attention_implementation="explicit"), "cuda")


def test_old_decode_layout_names_still_load(tmp_path):
    """Configs saved with the backend-named layouts ('cpu', 'plain') load as the shape-named ones."""
    import json

    from bart_jax.convert.checkpoints import NATIVE_CONFIG, load_model, save_model

    for old, new in (("cpu", "bnhs"), ("plain", "bsnh")):
        stored = {**tiny().to_dict(), "decode_layout": old}
        assert BartConfig.from_dict(json.loads(json.dumps(stored))).decode_layout == new
        assert tiny(decode_layout=old) == tiny(decode_layout=new)
    save_model(tmp_path / "model", tiny(), init_params(tiny()))
    saved = tmp_path / "model" / NATIVE_CONFIG
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "decode_layout": "cpu"}))
    assert load_model(tmp_path / "model")[0].decode_layout == "bnhs"


def test_explicit_and_jax_attention_agree_with_padding(cfg_params):
    """Both full-attention paths give the same logits (fully padded rows included) and the same gradients
    through real rows (a fully padded row, which carries no loss in training, is excluded: its output is
    uniform attention over nothing, and only the masked `where` stops its gradient)."""
    cfg, params = cfg_params
    ids = jnp.array([[0, 5, 6, 7, 8, 2, 1, 1], [0, 9, 10, 2, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    dec = jnp.array([[2, 0, 5, 6], [2, 0, 9, 1], [2, 1, 1, 1]], jnp.int32)

    def loss(p, impl):
        logits = Bart(cfg.replace(attention_implementation=impl)).apply(
            {"params": p}, ids, (ids != 1).astype(jnp.int32), dec, (dec != 1).astype(jnp.int32))
        real_rows = jnp.any(ids != 1, axis=1)[:, None, None]
        return jnp.sum(jnp.where(real_rows, jnp.sin(logits), 0.0)), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, a), ga = grad_fn(params, "explicit")
    (_, b), gb = grad_fn(params, "xla")
    chex.assert_tree_all_finite(a)
    chex.assert_trees_all_close(a, b, atol=1e-5)
    chex.assert_trees_all_close(ga, gb, atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_real_positions(cfg_params):
    cfg, params = cfg_params
    model = Bart(cfg)
    ids = jnp.array([[0, 5, 6, 2]]); dec = jnp.array([[2, 0, 5]])
    short = model.apply({"params": params}, ids, jnp.ones_like(ids), dec)
    padded_ids = jnp.array([[0, 5, 6, 2, 1, 1, 1]])
    long = model.apply({"params": params}, padded_ids, (padded_ids != 1).astype(jnp.int32), dec)
    chex.assert_trees_all_close(short, long, atol=1e-5)


def test_fully_padded_row_is_finite(cfg_params):
    cfg, params = cfg_params
    ids = jnp.array([[0, 5, 2], [1, 1, 1]])
    logits = Bart(cfg).apply({"params": params}, ids, (ids != 1).astype(jnp.int32), jnp.array([[2, 0], [2, 0]]))
    chex.assert_tree_all_finite(logits)


def test_preset_parameter_counts_match_hugging_face():
    # Hugging Face's published counts, plus final_logits_bias (one entry per vocabulary token).
    for name, hf_count in (("bart-base", 139_420_416), ("bart-large", 406_291_456)):
        cfg = preset(name)
        shapes = jax.eval_shape(lambda c=cfg: init_params(c))
        assert param_count(shapes) == hf_count + cfg.vocab_size, name


def test_logical_axes_cover_every_parameter():
    cfg = tiny()
    axes = param_logical_axes(cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg))
    for (path, spec), shape in zip(jax.tree_util.tree_flatten_with_path(axes)[0], jax.tree_util.tree_leaves(shapes)):
        assert len(spec) == len(shape.shape), jax.tree_util.keystr(path)
        assert all(isinstance(n, str) for n in spec), jax.tree_util.keystr(path)
    assert tuple(axes["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(axes["shared"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["decoder"]["layers"]["ffn"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")


def test_padded_vocab_gives_same_logits(cfg_params):
    cfg, params = cfg_params
    padded_cfg = cfg.replace(pad_vocab_to_multiple_of=128)
    assert padded_cfg.padded_vocab_size == 128
    padded = dict(params)
    padded["shared"] = {"embedding": jnp.pad(params["shared"]["embedding"], ((0, 128 - 97), (0, 0)))}
    padded["final_logits_bias"] = jnp.pad(params["final_logits_bias"], (0, 128 - 97))
    ids, am, dec, dm = batch()
    a = Bart(cfg).apply({"params": params}, ids, am, dec, dm)
    b = Bart(padded_cfg).apply({"params": padded}, ids, am, dec, dm)
    chex.assert_shape(b, a.shape)
    chex.assert_trees_all_close(a, b, atol=1e-6)


def test_gelu_is_exact_erf_form():
    x = jnp.linspace(-4, 4, 101)
    from scipy.special import erf
    exact = 0.5 * np.asarray(x) * (1 + erf(np.asarray(x) / np.sqrt(2)))
    np.testing.assert_allclose(activation("gelu")(x), exact, atol=1e-6)
    assert float(jnp.max(jnp.abs(activation("gelu_new")(x) - exact))) > 1e-4  # the approximation differs


def test_layer_norm_epsilon_default():
    assert BartConfig().layer_norm_eps == 1e-5


def test_over_long_input_is_a_clear_error(cfg_params):
    cfg, params = cfg_params
    ids = jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Bart(cfg).apply({"params": params}, ids, jnp.ones_like(ids), method="encode")


@pytest.mark.parametrize("field,value,match", [
    ("encoder_attention_heads", 5, "not divisible"),
    ("activation_function", "gelu_fast", "unknown activation"),
    ("encoder_ffn_dim", -3, "positive"),
    ("decoder_layers", 0, ">= 1"),
    ("dropout", 1.5, r"\[0, 1\)"),
    ("dtype", "float8", "expected one of"),
    ("pad_token_id", 10_000, "token id"),
    ("decode_layout", "gpu", "expected one of"),
])
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"BartConfig.{field}.*{match}"):
        preset("tiny", **{field: value})


def test_dropout_is_active_only_when_not_deterministic():
    cfg = tiny().replace(dropout=0.3)
    params = init_params(cfg)
    ids, am, dec, dm = batch()
    model = Bart(cfg)
    a = model.apply({"params": params}, ids, am, dec, dm, deterministic=True)
    b = model.apply({"params": params}, ids, am, dec, dm, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    c = model.apply({"params": params}, ids, am, dec, dm, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    chex.assert_trees_all_close(b, c)


def test_attention_dropout_path():
    cfg = tiny().replace(attention_dropout=0.2)
    params = init_params(cfg)
    ids, am, dec, dm = batch()
    model = Bart(cfg)
    a = model.apply({"params": params}, ids, am, dec, dm, deterministic=True)
    ref = Bart(tiny()).apply({"params": params}, ids, am, dec, dm)
    chex.assert_trees_all_close(a, ref, atol=1e-6)  # inactive when deterministic
    b = model.apply({"params": params}, ids, am, dec, dm, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_generate_lays_the_cache_out_for_the_platform_holding_the_parameters(cfg_params, monkeypatch):
    """'auto' is fixed before compiling, from where the parameters are (jit compiles for their devices)."""
    import importlib

    generate_lib = importlib.import_module("bart_jax.decode.generate")  # the module (the package re-exports `generate`)
    cfg, params = cfg_params
    assert generate_lib.params_platform(params) == "cpu"
    assert generate_lib.params_platform(jax.tree.map(np.asarray, params)) == jax.default_backend()
    seen = []

    def fake_generate_ids(config, *args, **kwargs):
        seen.append(config.decode_layout)
        return generate_lib.GenerateOutput(jnp.zeros((2, 1, 4), jnp.int32), jnp.zeros((2, 1)))

    monkeypatch.setattr(generate_lib, "generate_ids", fake_generate_ids)
    ids, am, _, _ = batch()
    generate_lib.generate(cfg, params, ids, am, max_length=4)
    monkeypatch.setattr(generate_lib, "params_platform", lambda params: "gpu")
    generate_lib.generate(cfg, params, ids, am, max_length=4)
    assert seen == ["bnhs", "bsnh"]


def test_generate_checks_the_source_length_with_the_model_rule(cfg_params):
    from bart_jax.decode import generate

    cfg, params = cfg_params
    ids = jnp.ones((1, cfg.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match="input_ids has length 33, more than max_position_embeddings=32"):
        generate(cfg, params, ids)
