"""Generation with the BART model: Hugging Face parity on the committed fixtures, cache vs full forward,
every control, padding/batching, bucketing and compiled-program reuse, presets and `summarize`."""

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bart_jax import Bart, preset
from bart_jax.decode.generate import (
    generate,
    generate_ids,
    load_generation_preset,
    pad_batch,
    resolve_controls,
    strip_special,
    summarize,
)
from bart_jax.decode.search import search

FIXTURES = Path(__file__).parent / "fixtures"
GENERATION_FIXTURES = ("bart_default", "bart_scaled", "mbart_preln")
EOS, PAD, BOS = 2, 1, 0


# ----------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("layout", ["bnhs", "bsnh"])
@pytest.mark.parametrize("name,scan_decoder",
                         [(name, False) for name in GENERATION_FIXTURES] + [("bart_default", True)])
def test_hugging_face_parity(name, scan_decoder, layout):
    """Token ids identical to HF PyTorch generate for every stored control set; scores within 1e-4.
    The default unrolled cached decoder on every fixture, the scan-over-layers one on bart_default; both
    decode layouts (BartConfig.decode_layout) on each."""
    from bart_jax.convert import from_pretrained

    path = FIXTURES / name / "generation.json"
    if not path.exists():
        pytest.skip(f"{path} missing: run tests/fixtures/make_fixtures.py")
    fixture = json.loads(path.read_text())
    config, params = from_pretrained(FIXTURES / name, decode_layout=layout)
    assert config.decode_layout_for() == layout
    common = fixture["common_controls"]
    assert (config.eos_token_id, config.pad_token_id) == (common["eos_token_id"], common["pad_token_id"])
    input_ids, mask = np.array(fixture["input_ids"]), np.array(fixture["attention_mask"])
    failures = []
    for run_name, run in fixture["runs"].items():
        out = generate(config, params, input_ids, mask, decoder_start_token_id=common["decoder_start_token_id"],
                       scan_decoder=scan_decoder, **run["controls"])
        got = np.asarray(out.sequences).reshape(-1, out.sequences.shape[-1])
        want = run["sequences"]
        width = len(want[0])
        for i, row in enumerate(want):
            if list(got[i, :width]) != row or (got[i, width:] != PAD).any():
                failures.append(f"{run_name} row {i}: want {row}, got {list(got[i])}")
        if run["sequences_scores"] is not None:
            np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), run["sequences_scores"], atol=1e-4,
                                       err_msg=f"{name}/{run_name} scores")
    assert not failures, "\n".join(failures)


def test_hugging_face_special_id_keywords():
    """HF's special-id keywords (eos_token_id an int other than the config's or a list, pad_token_id,
    bos_token_id) give HF PyTorch's tokens and scores (fixture generation_special_ids.json)."""
    from bart_jax.convert import from_pretrained

    fixture = json.loads((FIXTURES / "bart_default" / "generation_special_ids.json").read_text())
    config, params = from_pretrained(FIXTURES / "bart_default")
    input_ids, mask = np.array(fixture["input_ids"]), np.array(fixture["attention_mask"])
    start = fixture["common_controls"]["decoder_start_token_id"]
    failures = []
    for run_name, run in fixture["runs"].items():
        controls = run["controls"]
        out = generate(config, params, input_ids, mask, decoder_start_token_id=start, **controls)
        got = np.asarray(out.sequences).reshape(-1, out.sequences.shape[-1])
        pad = controls.get("pad_token_id", PAD)
        for i, row in enumerate(run["sequences"]):
            if list(got[i, :len(row)]) != row or (got[i, len(row):] != pad).any():
                failures.append(f"{run_name} row {i}: want {row}, got {list(got[i])}")
        if run["sequences_scores"] is not None:
            np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), run["sequences_scores"], atol=1e-4,
                                       err_msg=run_name)
    assert not failures, "\n".join(failures)


def test_special_id_keywords_defaults_and_validation():
    from bart_jax.convert import from_pretrained

    config, _ = from_pretrained(FIXTURES / "bart_default")
    # The config's own ids spelled out as HF callers do: the same controls as leaving them out.
    assert resolve_controls(config, eos_token_id=2, pad_token_id=1, bos_token_id=0) == resolve_controls(config)
    assert resolve_controls(config, eos_token_id=None).eos_token_id == (config.eos_token_id,)
    assert resolve_controls(config, eos_token_id=[7, 2, 7]).eos_token_id == (7, 2)
    for bad, match in [(dict(eos_token_id=[]), "eos_token_id"), (dict(eos_token_id=[2, 500]), "eos_token_id"),
                       (dict(eos_token_id="2"), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
                       (dict(bos_token_id=500), "bos_token_id")]:
        with pytest.raises(ValueError, match=match):
            resolve_controls(config, **bad)


def test_one_registry_of_generation_controls():
    """Every control `generate` accepts is a `bart-jax generate` option and a preset key, from one table."""
    import argparse

    from bart_jax.cli import decode as cli
    from bart_jax.decode.generate import CONTROL_NAMES, GENERATION_CONTROLS

    assert CONTROL_NAMES == tuple(GENERATION_CONTROLS)
    assert {"eos_token_id", "pad_token_id", "bos_token_id"} <= set(CONTROL_NAMES)
    parser = argparse.ArgumentParser()
    cli._add_model_and_control_args(parser)
    args = parser.parse_args(["--checkpoint", "x", "--eos-token-id", "2,50", "--pad-token-id", "3",
                              "--early-stopping", "never", "--forced-bos-token-id", "none", "--do-sample"])
    assert (args.eos_token_id, args.pad_token_id, args.early_stopping) == ([2, 50], 3, "never")
    assert args.forced_bos_token_id is None and args.do_sample is True
    assert all(hasattr(args, name) for name in CONTROL_NAMES)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "x", "--early-stopping", "maybe"])


# ----------------------------------------------------------------------------- a small trained model
@pytest.fixture(scope="module")
def model():
    """bart_default from the fixtures (a tiny BART trained to copy its input: varied, non-degenerate output)."""
    from bart_jax.convert import from_pretrained

    config, params = from_pretrained(FIXTURES / "bart_default")
    config = config.replace(forced_eos_token_id=None)
    reference = np.load(FIXTURES / "bart_default" / "reference.npz")
    input_ids = reference["input_ids"][:2].astype(np.int32)
    return config, params, input_ids, reference["attention_mask"][:2].astype(np.int32)


def with_bias(params, **token_bias):
    """Params with final_logits_bias[token] += value, to steer the model (e.g. eos=50 -> EOS at once)."""
    bias = params["final_logits_bias"]
    for token, value in token_bias.items():
        index = {"eos": EOS, "bos": BOS}[token] if token in ("eos", "bos") else int(token.lstrip("t"))
        bias = bias.at[index].add(value)
    return {**params, "final_logits_bias": bias}


def first_eos(row):
    row = list(row)
    return row.index(EOS, 1) if EOS in row[1:] else None


def repeated_ngram(row, n):
    row = [t for t in row if t != PAD]
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


# ----------------------------------------------------------------------------- cache path
def uncached_step(config, params, input_ids, mask, rows_per_input, max_length):
    """A step function that re-runs the full (uncached) decoder over the whole prefix every step."""
    model = Bart(config)
    enc = model.apply({"params": params}, input_ids, mask, method="encode")
    enc, mask = jnp.repeat(enc, rows_per_input, 0), jnp.repeat(mask, rows_per_input, 0)

    def step(tokens, index, buffer):
        buffer = buffer.at[:, index].set(tokens)
        logits = model.apply({"params": params}, buffer, enc, mask, method="decode")
        return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), buffer

    rows = input_ids.shape[0] * rows_per_input
    return step, jnp.full((rows, max_length), PAD, jnp.int32)


@pytest.mark.parametrize("controls", [
    dict(num_beams=1, max_length=10),
    dict(num_beams=3, max_length=10, no_repeat_ngram_size=2, min_length=4, length_penalty=1.3,
         num_return_sequences=3),
])
def test_cached_decoding_equals_full_forward(model, controls):
    config, params, input_ids, mask = model
    resolved = resolve_controls(config, **controls)
    cached = generate(config, params, input_ids, mask, **controls)
    step, buffer = uncached_step(config, params, input_ids, mask, controls["num_beams"], controls["max_length"])
    seqs, scores = jax.jit(lambda b: search(step, b, 2, resolved, 0))(buffer)
    np.testing.assert_array_equal(cached.sequences, seqs)
    np.testing.assert_allclose(cached.scores, scores, atol=1e-4)
    assert len({tuple(r) for r in np.asarray(seqs).reshape(-1, controls["max_length"])}) > 1


# ----------------------------------------------------------------------------- controls
@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_length_forbids_early_eos(model, num_beams):
    config, params, input_ids, mask = model
    eager = with_bias(params, eos=50.0)
    free = generate(config, eager, input_ids, mask, num_beams=num_beams, max_length=10)
    assert (np.asarray(free.sequences[:, 0, 1]) == EOS).all()  # without min_length: EOS at once
    held = generate(config, eager, input_ids, mask, num_beams=num_beams, max_length=10, min_length=6)
    for row in np.asarray(held.sequences[:, 0]):
        assert first_eos(row) == 6  # EOS allowed once the sequence (start token included) has 6 tokens


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_blocks_repeated_trigram(model, num_beams):
    config, params, input_ids, mask = model
    loop = with_bias(params, t7=40.0, t9=39.0, eos=-50.0)  # the model wants "7 7 7 ..." (then 9)
    free = generate(config, loop, input_ids, mask, num_beams=num_beams, max_length=10)
    assert all(repeated_ngram(r, 3) for r in np.asarray(free.sequences[:, 0]))
    blocked = generate(config, loop, input_ids, mask, num_beams=num_beams, max_length=10, no_repeat_ngram_size=3)
    assert not any(repeated_ngram(r, 3) for r in np.asarray(blocked.sequences[:, 0]))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_forced_bos_and_eos(model, num_beams):
    config, params, input_ids, mask = model
    steered = with_bias(params, bos=-50.0, eos=-50.0)  # neither would appear on its own
    free = np.asarray(generate(config, steered, input_ids, mask, num_beams=num_beams, max_length=10).sequences)
    assert (free[:, :, 1] != BOS).all() and (free[:, :, 1:] != EOS).all()
    forced = np.asarray(generate(config, steered, input_ids, mask, num_beams=num_beams, max_length=10,
                                 forced_bos_token_id=BOS, forced_eos_token_id=EOS).sequences)
    assert (forced[:, :, 1] == BOS).all() and (forced[:, :, 9] == EOS).all()
    assert (forced[:, :, 2:9] != EOS).all()


def test_control_defaults_follow_hugging_face(model):
    """Forced BOS/EOS and the decoder start come from the model config unless overridden (None = off);
    max_length defaults to 20 new tokens; max/min_new_tokens exclude the start token."""
    config, _, _, _ = model
    assert resolve_controls(config.replace(forced_eos_token_id=EOS)).forced_eos_token_id == EOS
    assert resolve_controls(config.replace(forced_eos_token_id=EOS), forced_eos_token_id=None).forced_eos_token_id == -1
    assert resolve_controls(config.replace(forced_bos_token_id=BOS)).forced_bos_token_id == BOS
    assert resolve_controls(config).decoder_start_token_id == config.decoder_start_token_id
    assert resolve_controls(config).max_length == 21
    assert resolve_controls(config, max_new_tokens=9).max_length == 10
    assert resolve_controls(config, min_new_tokens=4).min_length == 5


def test_max_new_tokens_and_decoder_start(model):
    config, params, input_ids, mask = model
    out = generate(config, with_bias(params, eos=-50.0), input_ids, mask, max_new_tokens=9, decoder_start_token_id=7)
    chex.assert_shape(out.sequences, (2, 1, 10))
    assert (np.asarray(out.sequences[:, 0, 0]) == 7).all()
    assert (np.asarray(out.sequences[:, 0, 1:]) != PAD).all()  # no EOS: all 9 new tokens generated


def test_num_return_sequences_and_scores(model):
    """Scores are HF's sequences_scores: sum of log-probs of the generated tokens / length ** penalty."""
    config, params, input_ids, mask = model
    lp = 0.7
    out = generate(config, params, input_ids, mask, num_beams=3, num_return_sequences=3, max_length=10,
                   length_penalty=lp)
    chex.assert_shape(out.sequences, (2, 3, 10))
    seqs, scores = np.asarray(out.sequences), np.asarray(out.scores)
    assert (np.diff(scores, axis=1) <= 0).all()
    forward = jax.jit(lambda ids, m, dec: jax.nn.log_softmax(Bart(config).apply({"params": params}, ids, m, dec), -1))
    for b in range(2):
        assert len({tuple(r) for r in seqs[b]}) == 3
        logp = np.asarray(forward(input_ids[b:b + 1].repeat(3, 0), mask[b:b + 1].repeat(3, 0), seqs[b]))
        for r in range(3):
            eos = first_eos(seqs[b, r])
            end = eos if eos is not None else 9
            total = sum(logp[r, t, seqs[b, r, t + 1]] for t in range(end))
            np.testing.assert_allclose(scores[b, r], total / end ** lp, atol=1e-4)


def test_one_compile_per_shape(model):
    """length_penalty / min_length are traced; a new batch of the same bucketed shape reuses the program."""
    config, params, input_ids, mask = model
    generate(config, params, input_ids, mask, num_beams=3, max_length=10, length_penalty=1.0)
    before = generate_ids._cache_size()
    for lp, min_len, early, r in ((2.0, 0, False, 1), (0.5, 5, "never", 2)):
        generate(config, params, input_ids[::-1], mask[::-1], num_beams=3, max_length=10, length_penalty=lp,
                 min_length=min_len, early_stopping=early, num_return_sequences=r, forced_bos_token_id=BOS)
    assert generate_ids._cache_size() == before


def test_padded_batch_equals_one_by_one(model):
    config, params, _, _ = model
    docs = [[0, 5, 9, 13, 17, 21, 25, 29, 2], [0, 33, 7, 2], [0, 40, 41, 42, 43, 2]]
    ids, mask, real = pad_batch(docs, config, batch_size=4)
    assert real == 3 and ids.shape == (4, 16)
    controls = dict(num_beams=3, max_length=10, no_repeat_ngram_size=2, min_length=3)
    batched = generate(config, params, ids, mask, **controls)
    for i, doc in enumerate(docs):
        alone_ids, alone_mask, _ = pad_batch([doc], config, batch_size=1)
        alone = generate(config, params, alone_ids, alone_mask, **controls)
        np.testing.assert_array_equal(batched.sequences[i], alone.sequences[0])
        np.testing.assert_allclose(batched.scores[i], alone.scores[0], atol=1e-5)


def test_bucketing_and_truncation(model):
    config, _, _, _ = model  # max_position_embeddings 64
    widths = [pad_batch([[5] * (n - 1) + [EOS]], config, batch_size=1)[0].shape[1] for n in (1, 16, 17, 33, 64)]
    assert widths == [16, 16, 32, 64, 64]  # powers of two from 16, capped at max_position_embeddings
    ids, mask, _ = pad_batch([list(range(3, 100)) + [EOS]], config, batch_size=2)
    assert ids.shape == (2, 64) and ids[0, -1] == EOS and mask[0].all()  # truncated, keeps its EOS
    assert list(ids[1, :2]) == [BOS, EOS] and mask[1].sum() == 2  # dummy fill row
    with pytest.raises(ValueError, match="batch_size"):
        pad_batch([[0, 2]] * 3, config, batch_size=2)


def test_bad_inputs_raise(model):
    config, params, input_ids, mask = model
    with pytest.raises(ValueError, match="unknown generation control"):
        generate(config, params, input_ids, mask, beam_size=4)
    with pytest.raises(ValueError, match="max_length"):
        generate(config, params, input_ids, mask, max_length=100)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(config, params, input_ids, mask[:, :3])


def test_presets():
    cnn = load_generation_preset("cnn_dm")
    assert cnn == dict(num_beams=4, length_penalty=2.0, max_length=142, min_length=56, no_repeat_ngram_size=3,
                       early_stopping=True, forced_bos_token_id=0, forced_eos_token_id=2)
    xsum = load_generation_preset("xsum")
    assert {k: xsum[k] for k in ("num_beams", "length_penalty", "max_length", "min_length",
                                 "no_repeat_ngram_size", "early_stopping")} == dict(
        num_beams=6, length_penalty=1.0, max_length=62, min_length=11, no_repeat_ngram_size=3, early_stopping=True)
    big = preset("bart-large")
    for name in ("default", "cnn_dm", "xsum"):
        resolve_controls(big, **load_generation_preset(name))  # every preset is valid
    with pytest.raises(ValueError, match="named presets"):
        load_generation_preset("nope")


class CharTokenizer:
    """A stand-in with the project tokenizer's batch interface: one id per lowercase letter."""

    def encode_batch(self, texts):
        return [[BOS] + [4 + (ord(c) - 97) % 50 for c in t if c.isalpha()] + [EOS] for t in texts]

    def decode_batch(self, batch):
        return ["".join(chr(97 + (i - 4) % 26) for i in ids) for ids in batch]


def test_summarize(model):
    config, params, _, _ = model
    texts = ["the cat sat", "dogs bark", "birds sing loud"]  # short: one length bucket, one program
    tokenizer = CharTokenizer()
    out = summarize(texts, config, params, tokenizer, batch_size=2, num_beams=3, max_length=10)
    assert len(out) == 3 and all(isinstance(s, str) and 0 < len(s) <= 8 for s in out)
    ids, mask, _ = pad_batch(tokenizer.encode_batch(texts[2:]), config, batch_size=2)
    direct = generate(config, params, ids, mask, num_beams=3, max_length=10)
    assert out[2] == tokenizer.decode_batch([strip_special(direct.sequences[0, 0], config)])[0]


def test_strip_special_cuts_at_any_eos_of_the_call():
    config = preset("tiny")
    controls = resolve_controls(config, eos_token_id=[EOS, 9], pad_token_id=3)
    row = [EOS, BOS, 5, 6, 9, 3, 3]
    assert strip_special(row, config, controls) == [5, 6]
    assert strip_special([EOS, BOS, 5, 6, 3, 3], config, controls) == [5, 6]  # the call's pad dropped
    assert strip_special(row, config) == [5, 6, 9, 3, 3]  # the config's ids only
