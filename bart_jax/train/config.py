"""Run configuration: frozen dataclasses, loaded with OmegaConf from YAML plus dotted `key=value` overrides.

A run config file (bundled: configs/{tiny,base,large}.yaml; or any YAML path) has these top-level
sections::

    workdir: runs/tiny            # checkpoints, TensorBoard events and the tokenizer live under here
    model:  {preset: tiny, dropout: 0.1, dtype: bfloat16, ...}   # preset + any BartConfig field
    noise:  {preset: bart_large, ...}                             # preset + any NoiseConfig field
    data:   {...}                 # DataConfig
    mesh:   {data: -1, fsdp: 1, tensor: 1}                        # -1 fills the remaining devices
    checkpoint: {keep: 3, keep_best: 1, best_metric: eval_loss, best_mode: min, async_save: true}
    distributed: {...}            # jax.distributed.initialize arguments (multi-host only)
    pretrain: {optimizer: {...}, schedule: {...}, train: {...}, init_from: null, run_name: pretrain}
    finetune: {optimizer: {...}, schedule: {...}, train: {...}, init_from: run:pretrain, ...}
    variants: {phase2: {pretrain.train.source_length: 512, ...}}   # named bundles of overrides

The dataclasses below are the OmegaConf schema: the YAML file, then a variant, then the `key=value`
overrides (e.g. `pretrain.train.steps=100`, `model.dtype=bfloat16`) are merged onto it, so unknown keys and
mistyped values fail with the key named. Mixed precision is the model's policy: `model.dtype` is the
compute dtype and `model.param_dtype` the master-parameter (and optimizer state) dtype; bf16 compute with
fp32 parameters is `model.dtype=bfloat16 model.param_dtype=float32`.
"""

from __future__ import annotations

import dataclasses
import io
import operator
import os
import typing
from typing import Any, Mapping, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from bart_jax.config import BartConfig, preset
from bart_jax.noise.config import NoiseConfig, noise_preset

# The run config a command reads without --config: the main job's (configs/tiny.yaml).
DEFAULT_CONFIG = "tiny"

OPTIMIZERS = ("lamb", "adamw")
DECAYS = ("constant", "linear", "polynomial", "cosine")
BEST_MODES = ("min", "max")
LOGITS_BIAS_INITS = ("target_prior", "zeros")
LABEL_SMOOTHING_FORMS = ("all_classes", "other_classes")  # see bart_jax.train.step.loss_sums
GRADIENT_REDUCTIONS = ("per_step", "per_micro_batch")  # see partitioning.gradient_shard_axes


# ----------------------------------------------------------------------------------------- sections
class _PresetFields:
    """A preset name plus every field of a target config (BartConfig / NoiseConfig). A field left at
    MISSING ('???', OmegaConf's "unset") takes the preset's value, or the checkpoint's for a run that
    starts from one: that is why unset and set-to-the-default must stay apart."""

    @property
    def overrides(self) -> dict[str, Any]:
        """{field: value} of the fields this config sets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "preset" and getattr(self, f.name) != MISSING}


class _ModelMethods(_PresetFields):
    def bart_config(self, **extra) -> BartConfig:
        """The architecture: the preset with the fields set here (and `extra`) applied."""
        return preset(self.preset, **{**self.overrides, **extra})


class _NoiseMethods(_PresetFields):
    def noise_config(self, **extra) -> NoiseConfig:
        """The noise: the preset with the fields set here (and `extra`) applied."""
        return noise_preset(self.preset, **{**self.overrides, **extra})


def _embed_fields(name: str, methods: type, target: type, default_preset: str) -> type:
    """A frozen dataclass `name` with `preset` and every field of `target`, typed as `target` types it
    (OmegaConf checks values against these types) and unset by default."""
    hints = typing.get_type_hints(target)
    fields = [("preset", str, default_preset)] + [(f.name, hints[f.name], MISSING) for f in dataclasses.fields(target)]
    cls = dataclasses.make_dataclass(name, fields, bases=(methods,), frozen=True)
    cls.__module__ = __name__  # picklable as a module-level class
    return cls


ModelSection = _embed_fields("ModelSection", _ModelMethods, BartConfig, "tiny")
NoiseSection = _embed_fields("NoiseSection", _NoiseMethods, NoiseConfig, "bart_large")  # the paper's recipe


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
    # Each split is read as this many disjoint shards, each process reading shards/processes of them
    # (null: one per process). The same value gives the same global batches on any number of processes.
    shards: int | None = None


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
    initialization_timeout_s: int = 300  # how long to wait for the coordinator and every process to join
    heartbeat_timeout_s: int = 100  # a process silent this long is dead: the others fail instead of hanging


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
    # With an fsdp mesh axis: "per_step" reduces each gradient once per step (the least communication; every
    # device holds a full float32 gradient), "per_micro_batch" reduce-scatters it in the backward pass of every
    # micro-batch (FSDP's memory). See bart_jax.train.partitioning.gradient_shard_axes.
    gradient_reduction: str = "per_step"
    source_length: int = 128  # pretraining: token block length (= noised input and target length)
    target_length: int = 64  # fine-tuning: summary length (source_length is the document length)
    seed: int = 0
    label_smoothing: float = 0.1
    label_smoothing_form: str = "all_classes"  # or "other_classes" (fairseq's); see train.step.loss_sums
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
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        validate(self)

    def stage(self, name: str) -> StageConfig:
        if name not in ("pretrain", "finetune"):
            raise ValueError(f"unknown stage {name!r}; expected 'pretrain' or 'finetune'")
        return getattr(self, name)

    def run_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, self.stage(stage).run_name or stage)

    def checkpoint_dir(self, stage: str) -> str:
        """Where `stage` keeps its training checkpoints (`bart_jax.train.checkpoint.Checkpointer`)."""
        return os.path.join(self.run_dir(stage), "checkpoints")

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the YAML layout: model/noise hold only the fields set), e.g. to store in a
        checkpoint."""
        out = dataclasses.asdict(self)
        for name in ("model", "noise"):
            section = getattr(self, name)
            out[name] = {"preset": section.preset, **section.overrides}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "RunConfig":
        return _instantiate(_merge(OmegaConf.structured(cls), d, where))


# ----------------------------------------------------------------------------------------- checks
def validate(cfg: RunConfig) -> None:
    def bad(field, value, why):
        raise ValueError(f"{field}={value!r}: {why}")

    minimum = {"checkpoint.keep": 1, "checkpoint.keep_best": 0}
    choices = {"checkpoint.best_mode": BEST_MODES}
    for stage in ("pretrain", "finetune"):
        choices.update({f"{stage}.optimizer.name": OPTIMIZERS, f"{stage}.schedule.decay": DECAYS,
                        f"{stage}.logits_bias_init": LOGITS_BIAS_INITS,
                        f"{stage}.train.label_smoothing_form": LABEL_SMOOTHING_FORMS,
                        f"{stage}.train.gradient_reduction": GRADIENT_REDUCTIONS})
        minimum.update({f"{stage}.schedule.warmup_steps": 0, f"{stage}.train.eval_every": 0,  # 0: no validation
                        f"{stage}.train.eval_rouge_examples": 0})  # 0: no ROUGE
        minimum.update({f"{stage}.train.{f}": 1 for f in (
            "steps", "batch_size", "micro_batches", "source_length", "target_length", "log_every", "eval_batches",
            "checkpoint_every", "max_nonfinite")})
    for key, low in minimum.items():
        if operator.attrgetter(key)(cfg) < low:
            bad(key, operator.attrgetter(key)(cfg), f"must be >= {low}")
    for key, allowed in choices.items():
        if operator.attrgetter(key)(cfg) not in allowed:
            bad(key, operator.attrgetter(key)(cfg), f"expected one of {allowed}")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            bad(f"mesh.{name}", v, "must be a positive size or -1 (fill)")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        bad("mesh", dataclasses.asdict(cfg.mesh), "at most one axis may be -1")
    # (batch vs micro-batches and batch shards: partitioning.check_batch_divisible; lengths vs positions:
    # preflight.check_lengths_fit — they need the devices or the model, so preflight checks them before any work)
    for stage in ("pretrain", "finetune"):
        o, t = cfg.stage(stage).optimizer, cfg.stage(stage).train
        if o.learning_rate <= 0:
            bad(f"{stage}.optimizer.learning_rate", o.learning_rate, "must be positive")
        for f in ("b1", "b2"):
            if not 0.0 <= getattr(o, f) < 1.0:
                bad(f"{stage}.optimizer.{f}", getattr(o, f), "must be in [0, 1)")
        if o.weight_decay < 0 or o.clip_norm < 0 or o.eps <= 0:
            bad(f"{stage}.optimizer", dataclasses.asdict(o), "weight_decay, clip_norm >= 0 and eps > 0 required")
        if not 0.0 <= t.label_smoothing < 1.0:
            bad(f"{stage}.train.label_smoothing", t.label_smoothing, "must be in [0, 1)")


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                variant: str | None = None) -> RunConfig:
    """RunConfig from a YAML file or a bundled config name such as 'tiny' (`DEFAULT_CONFIG` when `path` is
    None), a named variant, then `key=value`s. The file sets what differs from the dataclasses' defaults."""
    from bart_jax import configs

    where, text = configs.read_text(DEFAULT_CONFIG if path is None else path)
    try:
        raw = OmegaConf.load(io.StringIO(text))
    except Exception as e:  # the YAML parser's errors have no common base class
        raise ValueError(f"{where}: invalid YAML ({_first_line(e)})") from None
    if not isinstance(raw, DictConfig):
        raise ValueError(f"{where}: not a run config (its top level must be a mapping of sections such as "
                         "`pretrain:`)")
    node = _merge(OmegaConf.structured(RunConfig), raw, where)
    if variant:
        if variant not in node.variants:
            raise ValueError(f"{where}: no variant {variant!r}; defined: {sorted(node.variants)}")
        nested = OmegaConf.create()
        for key, value in OmegaConf.to_container(node.variants[variant]).items():
            OmegaConf.update(nested, key, value)
        node = _merge(node, nested, f"{where} variant {variant!r}")
    return _instantiate(_apply(node, overrides, "command line"))


def apply_overrides(cfg: RunConfig, overrides: Sequence[str], where: str = "command line") -> RunConfig:
    """`cfg` with `a.b.c=value` strings applied (values read as YAML, typed by the target field)."""
    return _instantiate(_apply(OmegaConf.structured(cfg), overrides, where))


# ----------------------------------------------------------------------------------------- internals
_KINDS = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _apply(node: DictConfig, overrides: Sequence[str], where: str) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"{where}: override {item!r} is not of the form key=value")
        if not item.split("=", 1)[0].strip():
            raise ValueError(f"{where}: override {item!r} has an empty key")
        try:
            parsed = OmegaConf.from_dotlist([item])
        except Exception as e:  # YAML or key-syntax errors
            raise ValueError(f"{where}: override {item!r}: {_first_line(e)}") from None
        node = _merge(node, parsed, where)
    return node


def _merge(node: DictConfig, incoming, where: str) -> DictConfig:
    """`incoming` (a mapping) merged onto the schema-typed `node`; any problem is one ValueError naming
    `where` and the key."""
    plain = OmegaConf.to_container(incoming) if isinstance(incoming, DictConfig) else incoming
    _check_bools(node, plain, where)
    try:
        return OmegaConf.merge(node, plain)
    except oc_errors.OmegaConfBaseException as e:
        key = e.full_key or str(e.key)
        if isinstance(e, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
            parent = key.rpartition(".")[0]
            section = OmegaConf.select(node, parent) if parent else node
            known = sorted(section) if isinstance(section, DictConfig) else []
            raise ValueError(f"{where}: unknown config key {key!r}; known keys here: {known}") from None
        expected = _KINDS.get(_base_type(_field_type(node, key)))
        why = f"expected {expected}" if expected else _first_line(e)
        raise ValueError(f"{where}: {key}={e.value!r}: {why}") from None


def _check_bools(node: DictConfig, plain: Mapping, where: str, prefix: str = "") -> None:
    """OmegaConf reads any integer as a bool (3 -> true); a config value for a bool field must be true/false."""
    for key, value in plain.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            child = node.get(key) if isinstance(node, DictConfig) and not OmegaConf.is_missing(node, key) else None
            if isinstance(child, DictConfig):
                _check_bools(child, value, where, full + ".")
        elif value is not None and not isinstance(value, bool) and _base_type(_field_type(node, key)) is bool:
            raise ValueError(f"{where}: {full}={value!r}: expected true/false")


def _field_type(node: DictConfig, key: str):
    """The annotated type of dotted `key` below `node` (None where no dataclass declares it)."""
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(node, parent, throw_on_missing=False) if parent else node
    cls = OmegaConf.get_type(section) if isinstance(section, DictConfig) else None
    return typing.get_type_hints(cls).get(leaf) if dataclasses.is_dataclass(cls) else None


def _base_type(tp):
    """`int` for `int` and `int | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and typing.get_origin(tp) is not tuple else tp


def _instantiate(node: DictConfig) -> RunConfig:
    """The frozen RunConfig of a merged schema node (model/noise keep their unset fields MISSING)."""
    sections = {}
    for name, cls in (("model", ModelSection), ("noise", NoiseSection)):
        fields = OmegaConf.to_container(node[name], throw_on_missing=False)
        sections[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    for name in node:
        if name not in sections:
            value = node[name]
            sections[name] = OmegaConf.to_object(value) if isinstance(value, DictConfig) else value
    return RunConfig(**sections)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
