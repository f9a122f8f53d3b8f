"""Hugging Face BART tensor names and layouts <-> bart_jax parameter trees (layers stacked on a scan axis,
attention kernels split per head, vocabulary rows padded)."""

from __future__ import annotations

import numpy as np

from bart_jax.config import BartConfig

# fairseq bookkeeping entries that carry no weights.
_JUNK_SUFFIXES = ("version", "_float_tensor")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the architecture, or a file that cannot be read."""


# --------------------------------------------------------------------------- name/layout mapping
def _attention_entries(prefix_ours, prefix_hf, heads, head_dim, d):
    """(our path, HF name, to_ours, to_hf) for one attention block's q/k/v/out projections."""
    out = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        out.append((f"{prefix_ours}/{proj}/kernel", f"{prefix_hf}.{proj}.weight",
                    lambda w: w.T.reshape(d, heads, head_dim), lambda k: k.reshape(d, heads * head_dim).T))
        out.append((f"{prefix_ours}/{proj}/bias", f"{prefix_hf}.{proj}.bias",
                    lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(heads * head_dim)))
    out.append((f"{prefix_ours}/out_proj/kernel", f"{prefix_hf}.out_proj.weight",
                lambda w: w.T.reshape(heads, head_dim, d), lambda k: k.reshape(heads * head_dim, d).T))
    out.append((f"{prefix_ours}/out_proj/bias", f"{prefix_hf}.out_proj.bias", _same, _same))
    return out


def _same(x):
    return x


def _layer_entries(config: BartConfig, stack: str):
    """Per-layer entries for 'encoder' or 'decoder' (our path relative to <stack>/layers)."""
    d = config.d_model
    heads = config.encoder_attention_heads if stack == "encoder" else config.decoder_attention_heads
    entries = _attention_entries("self_attn", "self_attn", heads, d // heads, d)
    norms = ["self_attn_layer_norm", "final_layer_norm"]
    if stack == "decoder":
        entries += _attention_entries("encoder_attn", "encoder_attn", heads, d // heads, d)
        norms.append("encoder_attn_layer_norm")
    for fc in ("fc1", "fc2"):
        entries.append((f"ffn/{fc}/kernel", f"{fc}.weight", lambda w: w.T, lambda k: k.T))
        entries.append((f"ffn/{fc}/bias", f"{fc}.bias", _same, _same))
    for norm in norms:
        entries.append((f"{norm}/scale", f"{norm}.weight", _same, _same))
        entries.append((f"{norm}/bias", f"{norm}.bias", _same, _same))
    return entries


def _stack_entries(config: BartConfig, stack: str):
    """Entries outside the layers of one stack."""
    entries = [(f"{stack}/embed_positions/embedding", f"{stack}.embed_positions.weight", _same, _same),
               (f"{stack}/layernorm_embedding/scale", f"{stack}.layernorm_embedding.weight", _same, _same),
               (f"{stack}/layernorm_embedding/bias", f"{stack}.layernorm_embedding.bias", _same, _same)]
    if config.add_final_layer_norm:
        entries += [(f"{stack}/layer_norm/scale", f"{stack}.layer_norm.weight", _same, _same),
                    (f"{stack}/layer_norm/bias", f"{stack}.layer_norm.bias", _same, _same)]
    return entries


def flatten(tree, prefix=""):
    """Nested dicts -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat):
    """{'a/b/c': leaf} -> nested dicts (the inverse of `flatten`)."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def expected_shapes(config: BartConfig) -> dict[str, tuple[int, ...]]:
    """Flat parameter path -> shape of the bart_jax parameters of `config` (nothing is allocated)."""
    import jax

    from bart_jax.model import init_params
    shapes = jax.eval_shape(lambda: init_params(config))
    return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)], axis=0)


# --------------------------------------------------------------------------- HF state dict <-> params
def shape_problems(flat: dict, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """'name: shape (..), expected (..)' for every array of `flat` whose shape differs from `expected`'s."""
    return [f"{k}: shape {tuple(flat[k].shape)}, expected {s}" for k, s in expected.items()
            if k in flat and tuple(flat[k].shape) != tuple(s)]


def _embeddings(config: BartConfig, state: dict, take, used: set[str], problems: list[str]) -> dict[str, np.ndarray]:
    """The token embedding (under any of its tied names), lm_head when untied, and final_logits_bias."""
    flat = {}
    emb_names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    present = [n for n in emb_names if n in state]
    if not present:
        problems.append("missing the token embedding (none of " + ", ".join(emb_names) + ")")
    else:
        emb = take(present[0])
        for n in present[1:]:
            used.add(n)
        if config.tie_word_embeddings:
            flat["shared/embedding"] = emb
        else:
            enc_names = [n for n in emb_names[:3] if n in state]
            flat["shared/embedding"] = take(enc_names[0]) if enc_names else emb
            if "lm_head.weight" in state:
                flat["lm_head"] = take("lm_head.weight")
            else:
                problems.append("missing lm_head.weight (tie_word_embeddings=False)")
    if "final_logits_bias" in state:
        flat["final_logits_bias"] = take("final_logits_bias").reshape(-1)
    else:  # absent in BartModel checkpoints: zeros, as Hugging Face does
        flat["final_logits_bias"] = np.zeros((config.vocab_size,), np.float32)
    return flat


def hf_state_dict_to_params(config: BartConfig, state: dict[str, np.ndarray], source: str = "checkpoint"):
    """Hugging Face-named tensors (with or without the `model.` prefix) -> bart_jax params (numpy, float32).

    Raises CheckpointError listing every missing, unexpected or wrongly shaped tensor.
    """
    state = {k: v for k, v in state.items() if not k.endswith(_JUNK_SUFFIXES)}
    if any(k.startswith("model.") for k in state):
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    used: set[str] = set()
    problems: list[str] = []

    def take(name):
        used.add(name)
        return np.asarray(state[name], dtype=np.float32)

    flat = _embeddings(config, state, take, used, problems)
    expected = expected_shapes(config)

    def convert(name, to_ours, want):
        """One tensor in our layout, or None with the problem recorded."""
        if name not in state:
            problems.append(f"missing {name}")
            return None
        try:
            value = to_ours(take(name))
        except ValueError:
            value = None
        if value is None or value.shape != want:
            problems.append(f"{name}: shape {tuple(state[name].shape)} does not fit the config "
                            f"(expected {want} in bart_jax layout)")
            return None
        return value

    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for ours, hf, to_ours, _ in _stack_entries(config, stack):
            value = convert(hf, to_ours, expected[ours])
            if value is not None:
                flat[ours] = value
        for ours, hf, to_ours, _ in _layer_entries(config, stack):
            key = f"{stack}/layers/{ours}"
            per_layer = [convert(f"{stack}.layers.{i}.{hf}", to_ours, expected[key][1:]) for i in range(n_layers)]
            if all(p is not None for p in per_layer):
                flat[key] = np.stack(per_layer)

    problems += [f"unexpected {n}" for n in sorted(set(state) - used)]
    for key in ("shared/embedding", "lm_head", "final_logits_bias"):
        if key in flat and flat[key].shape[0] == config.vocab_size:
            flat[key] = _pad_rows(flat[key], expected[key][0])
    problems += [p + " for this config" for p in shape_problems(flat, expected)]
    if problems:
        raise CheckpointError(f"{source} does not match the configured BART architecture:\n  "
                              + "\n  ".join(problems))
    return unflatten(flat)


def params_to_hf_state_dict(config: BartConfig, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """bart_jax params (or any tree like them, e.g. gradients) -> Hugging Face
    `BartForConditionalGeneration` tensors (`dtype`, logical vocab)."""
    flat = {k: np.asarray(v, dtype=dtype) for k, v in flatten(params).items()}
    vocab = config.vocab_size
    out = {"model.shared.weight": flat["shared/embedding"][:vocab],
           "final_logits_bias": flat["final_logits_bias"][:vocab][None, :]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = flat["lm_head"][:vocab]
    for stack, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for ours, hf, _, to_hf in _stack_entries(config, stack):
            out[f"model.{hf}"] = to_hf(flat[ours])
        for ours, hf, _, to_hf in _layer_entries(config, stack):
            stacked = flat[f"{stack}/layers/{ours}"]
            for i in range(n_layers):
                out[f"model.{stack}.layers.{i}.{hf}"] = np.ascontiguousarray(to_hf(stacked[i]))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
