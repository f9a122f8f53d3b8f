"""Run configuration: frozen dataclasses, loaded from YAML with dotted `key=value` overrides.

A run config file (bundled: bart_jax/configs/{tiny,base,large}.yaml; or any YAML path) has these top-level
sections::

    workdir: runs/tiny            # checkpoints, TensorBoard events and the tokenizer live under here
    model:  {preset: tiny, dropout: 0.1, dtype: bfloat16, ...}   # preset + any BartConfig field
    noise:  {preset: bart_large, ...}                             # preset + any noise-config field
    data:   {...}                 # DataConfig
    mesh:   {data: -1, fsdp: 1, tensor: 1}                        # -1 fills the remaining devices
    checkpoint: {keep: 3, keep_best: 1, best_metric: eval_loss, best_mode: min, async_save: true}
    distributed: {...}            # jax.distributed.initialize arguments (multi-host only)
    pretrain: {optimizer: {...}, schedule: {...}, train: {...}, init_from: null, run_name: pretrain}
    finetune: {optimizer: {...}, schedule: {...}, train: {...}, init_from: run:pretrain, ...}
    variants: {phase2: {pretrain.train.source_length: 512, ...}}   # named bundles of overrides

Overrides are `section.field=value` strings (e.g. `pretrain.train.steps=100`, `model.dtype=bfloat16`);
values are parsed as YAML scalars and checked against the field's type. Mixed precision is the model's
policy: `model.dtype` is the compute dtype and `model.param_dtype` the master-parameter (and optimizer
state) dtype; bf16 compute with fp32 parameters is `model.dtype=bfloat16 model.param_dtype=float32`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from bart_jax.config import BartConfig, preset

OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("constant", "linear", "polynomial", "cosine")
BEST_MODES = ("min", "max")
LOGITS_BIAS_INITS = ("target_prior", "zeros")


# ----------------------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class ModelSection:
    """An architecture preset plus BartConfig field overrides (kept as sorted (name, value) pairs)."""

    preset: str = "tiny"
    overrides: tuple[tuple[str, Any], ...] = ()

    def bart_config(self, **extra) -> BartConfig:
        return preset(self.preset, **{**dict(self.overrides), **extra})


@dataclasses.dataclass(frozen=True)
class NoiseSection:
    """A noise preset (bart_jax.noise) plus field overrides."""

    preset: str = "bart_large"  # the paper's large-model recipe (configs/*.yaml use it too)
    overrides: tuple[tuple[str, Any], ...] = ()

    def noise_config(self):
        from bart_jax import noise

        return noise.noise_preset(self.preset, **dict(self.overrides))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from. `tokenizer` None trains a SentencePiece model on the pretraining corpus
    into `<workdir>/tokenizer` (or reuses the one already there)."""

    tokenizer: str | None = None
    tokenizer_vocab_size: int = 512  # only used when training a tokenizer
    pretrain_source: str = "builtin"  # 'builtin', a TFDS name/dir, or a text file/glob (see bart_jax.data)
    finetune_source: str = "builtin"
    train_split: str = "train"
    eval_split: str = "validation"
    shuffle_seed: int = 0
    num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device-mesh axis sizes; exactly one may be -1 (fill with the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 3  # last N checkpoints kept
    keep_best: int = 1  # plus the best N by `best_metric` (validation)
    best_metric: str = "eval_loss"
    best_mode: str = "min"
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` arguments. Leave `enabled` false on one host. With it true and the
    other fields None, JAX auto-detects the cluster (SLURM, Cloud TPU, ...)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "lamb"
    learning_rate: float = 1e-3  # peak
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01  # never applied to biases, LayerNorm parameters or final_logits_bias
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    per_layer_trust_ratio: bool = True  # LAMB: one trust ratio per scanned layer, not per stacked leaf


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from 0 to the peak learning rate, then `decay` to `end_learning_rate` at the last step."""

    warmup_steps: int = 0
    decay: str = "linear"
    power: float = 1.0  # polynomial decay exponent
    end_learning_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps (each one global batch)
    batch_size: int = 8  # global sequences per step, over all processes
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many sequential parts
    source_length: int = 128  # pretraining: token block length (= noised input and target length)
    target_length: int = 64  # fine-tuning: summary length (source_length is the document length)
    seed: int = 0
    label_smoothing: float = 0.1
    label_smoothing_form: str = "all_classes"  # or "other_classes" (fairseq's); see train.step.LABEL_SMOOTHING_FORMS
    log_every: int = 10
    eval_every: int = 50  # 0 disables periodic validation
    eval_batches: int = 4
    eval_rouge_examples: int = 0  # fine-tuning: greedy-decode this many validation documents per eval (ROUGE)
    checkpoint_every: int = 50
    max_nonfinite: int = 5  # stop after this many consecutive NaN/inf steps
    progress_bar: bool = True
    peak_flops_per_device: float | None = None  # for MFU; None measures a matmul at start-up


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage (pretraining or fine-tuning)."""

    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    # None: random init. A path: a bart_jax checkpoint directory (a run's `checkpoints/` dir or one step
    # in it) or a Hugging Face model directory. 'run:NAME': the best/latest checkpoint of run NAME in
    # this workdir (e.g. 'run:pretrain').
    init_from: str | None = None
    # A random init's final_logits_bias: 'target_prior' (log unigram of the training targets; see
    # bart_jax/train/prior.py) or 'zeros' (the reference init). Ignored when init_from gives weights.
    logits_bias_init: str = "target_prior"
    run_name: str = ""  # subdirectory of workdir; '' means the stage name


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = "runs/default"
    model: ModelSection = ModelSection()
    noise: NoiseSection = NoiseSection()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    pretrain: StageConfig = StageConfig(optimizer=OptimizerConfig(name="lamb"))
    finetune: StageConfig = StageConfig(
        optimizer=OptimizerConfig(name="adamw", learning_rate=3e-5, eps=1e-8), init_from="run:pretrain")
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def __post_init__(self):
        validate(self)

    def stage(self, name: str) -> StageConfig:
        if name not in ("pretrain", "finetune"):
            raise ValueError(f"unknown stage {name!r}; expected 'pretrain' or 'finetune'")
        return getattr(self, name)

    def run_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, self.stage(stage).run_name or stage)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the YAML layout), e.g. to store in a checkpoint."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "RunConfig":
        return _build(cls, d, where)


# ----------------------------------------------------------------------------------------- checks
def validate(cfg: RunConfig) -> None:
    def bad(field, value, why):
        raise ValueError(f"{field}={value!r}: {why}")

    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            bad(f"mesh.{name}", v, "must be a positive size or -1 (fill)")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        bad("mesh", dataclasses.asdict(cfg.mesh), "at most one axis may be -1")
    if cfg.checkpoint.keep < 1:
        bad("checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    if cfg.checkpoint.keep_best < 0:
        bad("checkpoint.keep_best", cfg.checkpoint.keep_best, "must be >= 0")
    if cfg.checkpoint.best_mode not in BEST_MODES:
        bad("checkpoint.best_mode", cfg.checkpoint.best_mode, f"expected one of {BEST_MODES}")
    for stage in ("pretrain", "finetune"):
        s = cfg.stage(stage)
        o, sch, t = s.optimizer, s.schedule, s.train
        if o.name not in OPTIMIZERS:
            bad(f"{stage}.optimizer.name", o.name, f"expected one of {OPTIMIZERS}")
        if o.learning_rate <= 0:
            bad(f"{stage}.optimizer.learning_rate", o.learning_rate, "must be positive")
        for f in ("b1", "b2"):
            if not 0.0 <= getattr(o, f) < 1.0:
                bad(f"{stage}.optimizer.{f}", getattr(o, f), "must be in [0, 1)")
        if o.weight_decay < 0 or o.clip_norm < 0 or o.eps <= 0:
            bad(f"{stage}.optimizer", dataclasses.asdict(o), "weight_decay, clip_norm >= 0 and eps > 0 required")
        if s.logits_bias_init not in LOGITS_BIAS_INITS:
            bad(f"{stage}.logits_bias_init", s.logits_bias_init, f"expected one of {LOGITS_BIAS_INITS}")
        if sch.decay not in DECAYS:
            bad(f"{stage}.schedule.decay", sch.decay, f"expected one of {DECAYS}")
        if sch.warmup_steps < 0:
            bad(f"{stage}.schedule.warmup_steps", sch.warmup_steps, "must be >= 0")
        for f in ("steps", "batch_size", "micro_batches", "source_length", "target_length", "log_every",
                  "eval_batches", "checkpoint_every", "max_nonfinite"):
            if getattr(t, f) < 1:
                bad(f"{stage}.train.{f}", getattr(t, f), "must be >= 1")
        if t.eval_rouge_examples < 0:
            bad(f"{stage}.train.eval_rouge_examples", t.eval_rouge_examples, "must be >= 0 (0 disables ROUGE)")
        if t.eval_every < 0:
            bad(f"{stage}.train.eval_every", t.eval_every, "must be >= 0 (0 disables validation)")
        if t.batch_size % t.micro_batches:
            bad(f"{stage}.train.batch_size", t.batch_size,
                f"must be divisible by train.micro_batches={t.micro_batches}")
        if not 0.0 <= t.label_smoothing < 1.0:
            bad(f"{stage}.train.label_smoothing", t.label_smoothing, "must be in [0, 1)")


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
        fields = ("source_length",) if stage == "pretrain" else ("source_length", "target_length")
        for f in fields:
            if getattr(s.train, f) > model.max_position_embeddings:
                raise UserError(f"{stage}.train.{f}={getattr(s.train, f)} exceeds the model's "
                                f"max_position_embeddings={model.max_position_embeddings} (model.preset "
                                f"{cfg.model.preset!r}); lower it or set model.max_position_embeddings")
    if not cfg.distributed.enabled:  # jax.device_count() before jax.distributed.initialize would break it
        import jax

        from bart_jax.train import partitioning

        try:
            shape = partitioning.mesh_shape(cfg.mesh, jax.device_count())
        except ValueError as e:
            raise UserError(f"{e} (mesh.data/fsdp/tensor)") from None
        shards = shape[0] * shape[1]
        for stage in stages:
            t = cfg.stage(stage).train
            if t.batch_size % (t.micro_batches * shards):
                raise UserError(f"{stage}.train.batch_size={t.batch_size} must be divisible by micro_batches "
                                f"({t.micro_batches}) x the batch shards of the mesh (data x fsdp = {shards})")
    check_writable_dir(cfg.workdir, "workdir")


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                variant: str | None = None) -> RunConfig:
    """RunConfig from a YAML file or a bundled config name such as 'tiny' (defaults when `path` is None),
    a named variant, then `key=value`s."""
    where = os.fspath(path) if path is not None else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        from bart_jax import configs

        where, text = configs.read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: invalid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: top level must be a mapping of sections")
    cfg = RunConfig.from_dict(raw, where)
    if variant:
        named = dict(cfg.variants)
        if variant not in named:
            raise ValueError(f"{where}: no variant {variant!r}; defined: {sorted(named)}")
        cfg = apply_overrides(cfg, [f"{k}={_yaml_scalar(v)}" for k, v in named[variant]],
                              where=f"{where} variant {variant!r}")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: RunConfig, overrides: Sequence[str], where: str = "command line") -> RunConfig:
    """Apply `a.b.c=value` strings; the value is YAML-parsed and typed by the target field."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"{where}: override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"{where}: override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: override {item!r}: value is not valid YAML ({e})") from e
        parts = key.split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            if part in ("model", "noise") and i == 0:
                node = node.setdefault(part, {})
                continue
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ValueError(f"{where}: unknown config key {key!r} (no section {'.'.join(parts[:i + 1])!r})")
            node = node[part]
        if parts[0] not in ("model", "noise", "variants") and parts[-1] not in node:
            raise ValueError(f"{where}: unknown config key {key!r}; "
                             f"known keys here: {sorted(k for k in node)}")
        node[parts[-1]] = value
    return RunConfig.from_dict(d, where)


# ----------------------------------------------------------------------------------------- internals
def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def _to_plain(obj):
    if isinstance(obj, (ModelSection, NoiseSection)):
        return {"preset": obj.preset, **{k: _to_plain(v) for k, v in obj.overrides}}
    if isinstance(obj, RunConfig):
        out = {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "variants"}
        out["variants"] = {name: dict(pairs) for name, pairs in obj.variants}
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, where: str):
    """Check/convert a YAML value to the annotated field type, or raise a ValueError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _preset_section(cls, value, where: str, target_fields: dict[str, Any] | None, what: str):
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'preset' and {what} fields, got {value!r}")
    value = dict(value)
    name = value.pop("preset", cls().preset)
    if not isinstance(name, str):
        raise ValueError(f"{where}.preset: expected a string, got {name!r}")
    overrides = []
    for k in sorted(value):
        if target_fields is not None:
            if k not in target_fields:
                raise ValueError(f"{where}: unknown {what} field {k!r}; known: {sorted(target_fields)}")
            v = _coerce(value[k], target_fields[k], f"{where}.{k}")
        else:
            v = value[k]
        if isinstance(v, list):
            v = tuple(v)
        overrides.append((k, v))
    return cls(preset=name, overrides=tuple(overrides))


def _noise_fields() -> dict[str, Any] | None:
    try:
        from bart_jax import noise
    except ImportError:
        return None
    cls = getattr(noise, "NoiseConfig", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return _field_types(cls)


def _build(cls, d: Mapping[str, Any], where: str):
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {d!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(types_)}")
    kwargs = {}
    for name, value in d.items():
        sub = f"{where}: {name}" if cls is RunConfig else f"{where}.{name}"
        if cls is RunConfig and name == "model":
            kwargs[name] = _preset_section(ModelSection, value, sub, _field_types(BartConfig), "BartConfig")
        elif cls is RunConfig and name == "noise":
            kwargs[name] = _preset_section(NoiseSection, value, sub, _noise_fields(), "noise config")
        elif cls is RunConfig and name == "variants":
            if value is None:
                value = {}
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise ValueError(f"{sub}: expected a mapping of name -> {{dotted.key: value}}")
            kwargs[name] = tuple((str(k), tuple((str(kk), vv) for kk, vv in v.items())) for k, v in value.items())
        elif cls is RunConfig and name in ("pretrain", "finetune"):
            base = getattr(RunConfig(), name)
            kwargs[name] = _merge_stage(base, value, sub)
        else:
            kwargs[name] = _coerce(value, types_[name], sub)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def _merge_stage(base: StageConfig, value, where: str) -> StageConfig:
    """A stage section overrides only the fields it names (so stage defaults survive partial YAML)."""
    if value is None:
        return base
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    merged = _to_plain(base)
    for k, v in value.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return _build(StageConfig, merged, where)
