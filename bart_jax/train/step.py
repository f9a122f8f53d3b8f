"""Loss, the train step (gradient accumulation, non-finite guard) and the eval step, shared by
pretraining and fine-tuning, and their sharded jit compilation."""

from __future__ import annotations

import functools
from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bart_jax.config import BartConfig
from bart_jax.train import partitioning
from bart_jax.train.config import LABEL_SMOOTHING_FORMS
from bart_jax.train.optim import zero_frozen
from bart_jax.train.state import TrainState

# batch_fn(raw_batch, index) -> model batch. `index` is an int32 scalar (the train step, or the eval
# batch number) so on-device noise can derive its key from it; fine-tuning uses the identity.
BatchFn = Callable[[dict, jax.Array], dict]

MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")

# Where label smoothing puts its mass eps. "all_classes" (PyTorch's CrossEntropyLoss, Hugging Face, the
# default): eps/V on every one of the V classes, the target included, so the target gets 1 - eps + eps/V.
# "other_classes" (fairseq's label_smoothed_cross_entropy): eps/(V-1) on each non-target class, the target 1 - eps.
# The names: bart_jax.train.config.LABEL_SMOOTHING_FORMS (the config checks them).


def identity_batch(batch: dict, index) -> dict:
    del index
    return batch


def loss_sums(logits, labels, pad_id: int, label_smoothing: float, form: str = "all_classes"):
    """Label-smoothed cross-entropy summed over real target tokens.

    logits: f32 (or f64) [B, T, V] over the logical vocabulary; labels: int [B, T] (pad_id or a negative id marks
    positions without loss). `form` (LABEL_SMOOTHING_FORMS) says where the `label_smoothing` mass eps goes:
    "all_classes": loss_t = (1 - eps) * nll_t + eps/V * sum_v(-log p_v);
    "other_classes": loss_t = (1 - eps) * nll_t + eps/(V-1) * sum_{v != y_t}(-log p_v).
    Returns f32 (f64 for f64 logits) scalars (smoothed_sum, nll_sum, correct_sum) and int32 token count.
    """
    check_label_smoothing_form(form)
    chex.assert_rank([logits, labels], [3, 2])
    chex.assert_equal_shape_prefix([logits, labels], 2)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays float64
    mask = (labels != pad_id) & (labels >= 0)
    safe = jnp.where(mask, labels, 0)
    # One max serves the log-sum-exp and the accuracy: a target whose logit reaches the maximum counts as
    # correct (ties included), which spares an argmax pass over [B, T, V].
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = lse - target
    smooth = lse - jnp.mean(logits, axis=-1)  # mean_v(-log p_v)
    if form == "all_classes":
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    else:
        vocab = logits.shape[-1]
        per_token = (1.0 - label_smoothing) * nll + label_smoothing / (vocab - 1) * (vocab * smooth - nll)
    correct = (target >= top) & mask
    return (jnp.sum(jnp.where(mask, per_token, 0.0)), jnp.sum(jnp.where(mask, nll, 0.0)),
            jnp.sum(correct).astype(jnp.float32), jnp.sum(mask).astype(jnp.int32))


def check_label_smoothing_form(form: str):
    if form not in LABEL_SMOOTHING_FORMS:
        raise ValueError(f"label smoothing form {form!r}: expected one of {LABEL_SMOOTHING_FORMS}")


def _forward(model, params, batch, dropout_key, deterministic: bool):
    return model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
        batch.get("decoder_attention_mask"), deterministic=deterministic, rngs={"dropout": dropout_key})


def _split_micro(batch: dict, micro_batches: int) -> dict:
    """[B, ...] -> [M, B/M, ...] taking rows m, m+M, m+2M, ... for micro-batch m, so a batch sharded in
    contiguous row blocks splits without moving data between devices."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _shard_rows(batch: dict, shards: int) -> dict:
    """[B, ...] -> [shards, B/shards, ...]: block s holds the rows batch shard s holds (the batch is split
    over data x fsdp in contiguous row blocks)."""
    return jax.tree.map(lambda x: x.reshape(shards, x.shape[0] // shards, *x.shape[1:]), batch)


def accumulate(micro_grads, micro: dict, step_key, zeros, constrain):
    """Sum `micro_grads(batch, key) -> (grads, loss, nll, correct)` over micro-batches in a scan.

    micro: the model batch split as [M, B/M, ...] (`_split_micro`); micro-batch i draws its dropout from
    fold_in(step_key, i). zeros: the float32 gradient carry (pinned by `constrain`).
    """
    def body(carry, xs):
        acc, loss_acc, nll_acc, corr_acc = carry
        i, mb = xs
        g, loss, nll, correct = micro_grads(mb, jax.random.fold_in(step_key, i))
        acc = constrain(jax.tree.map(jnp.add, acc, g))
        return (acc, loss_acc + loss, nll_acc + nll, corr_acc + correct), None

    scalar = jnp.zeros((), jnp.float32)
    num_micro = jax.tree.leaves(micro)[0].shape[0]
    (grads, loss, nll, correct), _ = jax.lax.scan(body, (constrain(zeros), scalar, scalar, scalar),
                                                  (jnp.arange(num_micro), micro))
    return grads, loss, nll, correct


def guarded_update(state: TrainState, grads, loss, total_tokens, optimizer: optax.GradientTransformation):
    """One optimizer update, applied only when the loss and gradient norm are finite and the batch has tokens.

    A non-finite step leaves params/opt_state unchanged and bumps `nonfinite_streak` / `nonfinite_total`;
    any finite step resets the streak. Returns (new state with step + 1, metrics {grad_norm, skipped,
    nonfinite_streak, nonfinite_total}).
    """
    # Frozen leaves (final_logits_bias, a buffer in Hugging Face) have no gradient: the reported norm
    # and the non-finite guard see what PyTorch would.
    grads = zero_frozen(grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite & (total_tokens > 0)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    def update(params, opt_state):
        updates, new_opt = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A branch, not a `where` over the results: a select keeps the old optimizer state alive next to the new,
    # so XLA copies every moment tensor each step before updating it in place.
    new_params, new_opt = jax.lax.cond(apply, update, lambda params, opt_state: (params, opt_state),
                                       state.params, state.opt_state)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
    total_bad = (state.nonfinite_total + jnp.where(finite, 0, 1)).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, updates=state.updates + apply.astype(jnp.int32),
        params=new_params, opt_state=new_opt,
        nonfinite_streak=streak, nonfinite_total=total_bad)
    return new_state, {"grad_norm": grad_norm, "skipped": (~apply).astype(jnp.int32),
                       "nonfinite_streak": streak, "nonfinite_total": total_bad}


def _per_shard_gradients(model, params, denom, deterministic: bool, loss_sums_fn, constrain_partial,
                         axes: tuple[str, ...]):
    """(micro_grads, shards): micro_grads(batch, key) -> (grads [shards, *param shape] float32, loss, nll,
    correct) for the mesh set at trace time.

    Each shard of the mesh `axes` (`partitioning.gradient_shard_axes`) differentiates its own rows (a vmap over
    the shards, laid out on those axes) and keeps its partial gradient sum through all micro-batches; the one
    reduction over those axes per step is `_sum_over_shards`. Under plain jit the partitioner would reduce every
    micro-batch's gradient, and each use of the tied embedding's, separately. Shard s draws its dropout from
    fold_in(key, s).
    """
    shards = partitioning.shards_in_context(axes)
    spmd_axes = None if jax.sharding.get_abstract_mesh().empty else axes
    shard_rules = partitioning.per_shard_rules(nn.get_logical_axis_rules(), axes)

    def shard_grads(rows, key):
        def loss_fn(p):
            sm, nll, correct, _ = loss_sums_fn(_forward(model, p, rows, key, deterministic), rows["labels"])
            return sm / denom, (nll, correct)

        (loss, (nll, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads)
        return grads, loss, nll, correct

    def micro_grads(mb, key):
        keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(shards))
        with nn.logical_axis_rules(shard_rules):
            grads, loss, nll, correct = jax.vmap(shard_grads, spmd_axis_name=spmd_axes)(
                _shard_rows(mb, shards), keys)
        return constrain_partial(grads), jnp.sum(loss), jnp.sum(nll), jnp.sum(correct)

    return micro_grads, shards


def _sum_over_shards(partial, grad_shardings, axes: tuple[str, ...]):
    """The step's gradient: the shards' partial sums [shards, ...] added, reduced onto `grad_shardings`
    (`partitioning.sum_partials`)."""
    with jax.named_scope("sum_gradients"):
        if grad_shardings is None:
            return jax.tree.map(lambda g: jnp.sum(g, axis=0), partial)
        return jax.tree.map(lambda g, s: partitioning.sum_partials(g, s, axes), partial, grad_shardings)


def make_train_step(model_config: BartConfig, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, micro_batches: int = 1, label_smoothing: float = 0.1,
                    label_smoothing_form: str = "all_classes", batch_fn: BatchFn = identity_batch,
                    grad_shardings=None, gradient_reduction: str = "per_step"):
    """train_step(state, batch) -> (state, metrics).

    batch: whatever `batch_fn` turns into a model batch (int32 [B, ...] arrays: input_ids, attention_mask,
    decoder_input_ids, decoder_attention_mask, labels). The loss is the label-smoothed CE (`loss_sums`, in
    `label_smoothing_form`) summed over the real target tokens of the whole global batch divided by their
    count (0 tokens: loss 0, no update), so M micro-batches give exactly the gradient of the full batch.
    Gradients accumulate in float32 per shard of the mesh axes `gradient_reduction` names
    (`partitioning.gradient_shard_axes`: data x fsdp for "per_step", data for "per_micro_batch"): each
    device keeps a partial sum over its rows of every micro-batch, and the shards' sums are reduced once per
    step (`partitioning.sum_partials`). Dropout keys fold in the micro-batch and the shard index, so masks
    depend on the mesh's shard count over those axes.
    A step whose loss or gradient norm is not finite leaves params/opt_state unchanged and bumps
    `nonfinite_streak` / `nonfinite_total`; any finite step resets the streak.
    metrics (f32/int32 scalars): loss, nll, accuracy, tokens, grad_norm, learning_rate, skipped,
    nonfinite_streak, nonfinite_total.
    """
    from bart_jax.model import Bart

    check_label_smoothing_form(label_smoothing_form)
    axes = partitioning.gradient_shard_axes(gradient_reduction)
    model = Bart(model_config)
    pad_id = model_config.pad_token_id
    deterministic = model_config.dropout == 0 and model_config.attention_dropout == 0 \
        and model_config.activation_dropout == 0

    partial_shardings = None if grad_shardings is None else jax.tree.map(
        lambda s: partitioning.partial_sum_sharding(s, axes), grad_shardings)

    def constrain_partial(tree):
        # Only the gradients are pinned (elsewhere XLA propagates shardings from the state's in/out
        # shardings): the partial sums here to one per shard, their total in `_sum_over_shards`.
        return tree if partial_shardings is None else jax.lax.with_sharding_constraint(tree, partial_shardings)

    def train_step(state: TrainState, batch: dict):
        full = batch_fn(batch, state.step)
        full = {k: full[k] for k in MODEL_KEYS if k in full}
        labels = full["labels"]
        total_tokens = jnp.sum((labels != pad_id) & (labels >= 0)).astype(jnp.int32)
        denom = jnp.maximum(total_tokens, 1).astype(jnp.float32)
        step_key = jax.random.fold_in(state.rng, state.step)

        micro_grads, shards = _per_shard_gradients(
            model, state.params, denom, deterministic, lambda logits, labels: loss_sums(
                logits, labels, pad_id, label_smoothing, label_smoothing_form),
            constrain_partial, axes)

        if micro_batches == 1:
            partial, loss, nll, correct = micro_grads(full, step_key)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros((shards, *p.shape), jnp.promote_types(p.dtype, jnp.float32)),
                                 state.params)
            partial, loss, nll, correct = accumulate(micro_grads, _split_micro(full, micro_batches), step_key,
                                                     zeros, constrain_partial)
        grads = _sum_over_shards(partial, grad_shardings, axes)

        new_state, update_metrics = guarded_update(state, grads, loss, total_tokens, optimizer)
        metrics = {"loss": loss, "nll": nll / denom, "accuracy": correct / denom, "tokens": total_tokens,
                   "learning_rate": jnp.asarray(schedule(state.updates), jnp.float32), **update_metrics}
        return new_state, metrics

    return train_step


def make_eval_step(model_config: BartConfig, *, label_smoothing: float = 0.1,
                   label_smoothing_form: str = "all_classes", batch_fn: BatchFn = identity_batch):
    """eval_step(params, batch, index) -> sums {'loss_sum', 'nll_sum', 'correct', 'tokens'} (deterministic).

    Sum over eval batches, then divide by the summed token count (`summarize_eval`).
    """
    from bart_jax.model import Bart

    check_label_smoothing_form(label_smoothing_form)
    model = Bart(model_config)
    pad_id = model_config.pad_token_id

    def eval_step(params, batch: dict, index):
        full = batch_fn(batch, index)
        logits = _forward(model, params, full, jax.random.PRNGKey(0), True)
        sm, nll, correct, count = loss_sums(logits, full["labels"], pad_id, label_smoothing, label_smoothing_form)
        return {"loss_sum": sm, "nll_sum": nll, "correct": correct, "tokens": count}

    return eval_step


def summarize_eval(sums: dict) -> dict:
    """Token-averaged eval metrics from summed `eval_step` outputs (0 tokens -> 0, never NaN)."""
    n = max(float(sums["tokens"]), 1.0)
    return {"eval_loss": float(sums["loss_sum"]) / n, "eval_nll": float(sums["nll_sum"]) / n,
            "eval_accuracy": float(sums["correct"]) / n, "eval_tokens": int(sums["tokens"])}


class Compiled:
    """A jitted function that runs under the mesh and the logical-axis rules (needed at trace time for
    the model's `nn.with_logical_constraint`)."""

    def __init__(self, fn, mesh: Mesh, rules):
        self._fn, self._mesh, self._rules = fn, mesh, rules

    def _call(self, method, args):
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return method(*args)

    @property
    def rules(self):
        return self._rules

    def __call__(self, *args):
        return self._call(self._fn, args)

    def lower(self, *args):
        return self._call(self._fn.lower, args)

    def trace(self, *args):
        """jax.stages.Traced, e.g. to `.lower(lowering_platforms=("cuda",))` on a machine without a GPU."""
        return self._call(self._fn.trace, args)


def compile_train_step(train_step, shardings: TrainState, mesh: Mesh,
                       rules=partitioning.LOGICAL_AXIS_RULES) -> Compiled:
    """One jax.jit with explicit shardings: state in/out as `shardings` (donated), batch rows over
    data x fsdp, metrics replicated."""
    fn = jax.jit(train_step,
                 in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, partitioning.replicated(mesh)),
                 donate_argnums=0)
    return Compiled(fn, mesh, rules)


def compile_eval_step(eval_step, param_shardings, mesh: Mesh, rules=partitioning.LOGICAL_AXIS_RULES) -> Compiled:
    fn = jax.jit(eval_step,
                 in_shardings=(param_shardings, partitioning.batch_sharding(mesh), partitioning.replicated(mesh)),
                 out_shardings=partitioning.replicated(mesh))
    return Compiled(fn, mesh, rules)
