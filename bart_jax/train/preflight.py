"""The checks a run config gets before any work (tokenizer training, dataset build, directory creation),
so a mistake costs a one-line error, not minutes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the config module re-exports this check; no import cycle at run time
    from bart_jax.train.config import RunConfig


def check_run_config(cfg: RunConfig, stages: Sequence[str] = ("pretrain", "finetune")) -> None:
    """Everything about a run config that can be checked without data: the model and noise presets
    (building the BartConfig and the noise config, so unknown presets, fields and dtypes fail here),
    sequence lengths against the model's positions, the mesh against the devices, batch sizes against the
    mesh, and that the workdir can be written. Raises UserError; call it before any tokenizer training,
    dataset build or directory creation."""
    from bart_jax.errors import UserError, check_writable_dir

    try:
        model = cfg.model.bart_config()
    except (ValueError, TypeError) as e:
        raise UserError(f"model (preset {cfg.model.preset!r}): {e}") from None
    try:
        cfg.noise.noise_config()
    except (ValueError, TypeError) as e:
        raise UserError(f"noise (preset {cfg.noise.preset!r}): {e}") from None
    for stage in stages:
        s = cfg.stage(stage)
        # A stage that starts from a foreign checkpoint takes its positions from there (checked on load).
        if s.init_from and not s.init_from.startswith("run:"):
            continue
        check_lengths_fit(stage, s.train, model, f" (model.preset {cfg.model.preset!r})")
    if not cfg.distributed.enabled:  # jax.device_count() before jax.distributed.initialize would break it
        import jax

        from bart_jax.errors import check_platform
        from bart_jax.train import partitioning

        check_platform()
        try:
            shape = partitioning.mesh_shape(cfg.mesh, jax.device_count())
        except ValueError as e:
            raise UserError(f"{e} (mesh.data/fsdp/tensor)") from None
        for stage in stages:
            t = cfg.stage(stage).train
            try:
                partitioning.check_batch_divisible(t.batch_size, t.micro_batches, shape[0] * shape[1],
                                                   f"{stage}.train.batch_size")
            except ValueError as e:
                raise UserError(str(e)) from None
            _check_memory(cfg, stage, model, shape)
    check_writable_dir(cfg.workdir, "workdir")


def check_lengths_fit(stage: str, t, model, where: str = "") -> None:
    """The one rule for lengths: the stage's sequences fit the model's positions (UserError). The model is the
    config's before any work, and the checkpoint's once a stage starts from one (`setup`)."""
    from bart_jax.errors import UserError

    fields = ("source_length",) if stage == "pretrain" else ("source_length", "target_length")
    for f in fields:
        if getattr(t, f) > model.max_position_embeddings:
            raise UserError(f"{stage}.train.{f}={getattr(t, f)} exceeds the model's max_position_embeddings="
                            f"{model.max_position_embeddings}{where}; lower it or set model.max_position_embeddings")


def _device_memory_bytes() -> int | None:
    """Memory one local device can use: a GPU's allocator limit, or the host's RAM shared by its CPU devices."""
    import os

    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
        except (ValueError, OSError):
            return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def _check_memory(cfg: RunConfig, stage: str, model, mesh_shape) -> None:
    """Refuse a stage whose step cannot fit a device's memory, by a lower bound that needs no compile: the fp32
    parameters and two optimizer moments (12 bytes a parameter, split over fsdp x tensor), the fp32 gradient
    (split over tensor, and over fsdp too with `train.gradient_reduction=per_micro_batch`) plus one micro-batch's
    fp32 logits. Only a bound known to exceed what the device has is an error; XLA finds any subtler shortfall."""
    from bart_jax.errors import UserError

    available = _device_memory_bytes()
    if not available:
        return
    data, fsdp, tensor = mesh_shape
    t = cfg.stage(stage).train
    d, vocab = model.d_model, model.padded_vocab_size
    params = (vocab * d + model.encoder_layers * (4 * d * d + 2 * d * model.encoder_ffn_dim)
              + model.decoder_layers * (8 * d * d + 2 * d * model.decoder_ffn_dim))

    def state_bytes(reduction):
        gradient_split = tensor * (fsdp if reduction == "per_micro_batch" else 1)
        return 12 * params / (fsdp * tensor) + 4 * params / gradient_split

    state = state_bytes(t.gradient_reduction)
    rows = t.batch_size // (t.micro_batches * data * fsdp)
    target = t.source_length if stage == "pretrain" else t.target_length
    logits = 4 * rows * target * vocab / tensor
    if state + logits <= available:
        return
    gb = 1e9
    remedy = (f"raise {stage}.train.micro_batches or lower batch_size, add devices, or use a smaller config "
              "(--config tiny)")
    if fsdp > 1 and t.gradient_reduction == "per_step" and state_bytes("per_micro_batch") + logits <= available:
        remedy = (f"set {stage}.train.gradient_reduction=per_micro_batch (the gradient split over fsdp, reduced "
                  f"every micro-batch), or {remedy}")
    raise UserError(
        f"{stage} needs more memory than a device here has: at least {(state + logits) / gb:.1f} GB per device "
        f"(parameters, gradients and optimizer moments {state / gb:.1f} GB + one micro-batch's logits "
        f"{logits / gb:.1f} GB: {rows} rows x {target} tokens x {vocab} vocabulary), and each device has "
        f"{available / gb:.1f} GB; model.preset {cfg.model.preset!r} at batch {t.batch_size} is sized for GPU "
        f"pods: {remedy}")
