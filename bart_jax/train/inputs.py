"""What a training stage reads: the tokenizer (trained into the workdir the first time), the prepared
dataset of its data source, its batch iterators, and pretraining's on-device noise."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from bart_jax.data.text import as_text
from bart_jax.errors import UserError
from bart_jax.train.config import RunConfig

EVAL_NOISE_SEED_OFFSET = 7919  # eval batches are noised by a fixed stream, distinct from training's

logger = logging.getLogger(__name__)

TOKENIZER_PROVENANCE_FILE = "trained_from.json"
_PROVENANCE_LABELS = {"pretrain_source": "data.pretrain_source", "tokenizer_vocab_size": "data.tokenizer_vocab_size",
                      "dataset_fingerprint": "the pretraining dataset's content fingerprint"}


def _tokenizer_provenance(cfg: RunConfig) -> dict:
    """What a workdir tokenizer is trained from: the pretraining source (a prepared dataset also by its
    content fingerprint) and the vocabulary size."""
    source = cfg.data.pretrain_source
    out = {"pretrain_source": source, "tokenizer_vocab_size": cfg.data.tokenizer_vocab_size}
    if source != "builtin":
        out["pretrain_source"] = os.path.abspath(source)
        try:
            with open(os.path.join(source, "metadata.json")) as f:
                out["dataset_fingerprint"] = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            pass  # not a prepared dataset: `prepared_dataset` says so when it is opened
    return out


def _check_tokenizer_provenance(cfg: RunConfig, directory: str) -> None:
    """Refuse a workdir tokenizer trained from another source or with another vocabulary size."""
    path = os.path.join(directory, TOKENIZER_PROVENANCE_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        logger.warning("%s has no %s (trained by an older bart_jax): cannot check that it matches "
                       "data.pretrain_source and data.tokenizer_vocab_size", directory, TOKENIZER_PROVENANCE_FILE)
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete {directory} to retrain the tokenizer") from None
    wanted = _tokenizer_provenance(cfg)
    differ = [k for k in wanted if k in stored and stored[k] != wanted[k]]
    if differ:
        def show(d):
            return ", ".join(f"{_PROVENANCE_LABELS[k]}={d.get(k)!r}" for k in differ)

        raise ValueError(
            f"the tokenizer in {directory} was trained with {show(stored)}, but this run has {show(wanted)}; "
            f"delete {directory} to train a new one, or set data.tokenizer={directory} to use it as it is")


def load_or_train_tokenizer(cfg: RunConfig):
    """`data.tokenizer` if set; else the tokenizer in `<workdir>/tokenizer`, trained there on the
    pretraining corpus's train split the first time. What it was trained from (source, vocabulary size) is
    recorded beside it in `trained_from.json`; a later run configured otherwise is refused (ValueError)."""
    from bart_jax.data import load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
    directory = os.path.join(cfg.workdir, "tokenizer")
    if jax.process_count() > 1:  # the workdir is shared: process 0 trains it, then all load the same files
        in_process_zero(lambda: _workdir_tokenizer(cfg, directory), "prepare the tokenizer")
    return _workdir_tokenizer(cfg, directory), directory


def _workdir_tokenizer(cfg: RunConfig, directory: str):
    """The tokenizer in `directory` (its provenance checked), trained there first when there is none."""
    from bart_jax.data import load_tokenizer, train_tokenizer

    try:
        tok = load_tokenizer(directory)
    except FileNotFoundError:
        pass
    else:
        _check_tokenizer_provenance(cfg, directory)
        return tok
    tok = train_tokenizer(_tokenizer_texts(cfg), cfg.data.tokenizer_vocab_size, directory,
                          seed=cfg.data.shuffle_seed)
    tmp = os.path.join(directory, TOKENIZER_PROVENANCE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_tokenizer_provenance(cfg), f, indent=1)
    os.replace(tmp, os.path.join(directory, TOKENIZER_PROVENANCE_FILE))
    return tok


def in_process_zero(fn, what: str):
    """Run `fn()` in process 0 only, while the other processes wait; all then go on, or all fail (process 0
    with `fn`'s own error, the others with a line saying that process 0 failed to `what`)."""
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))  # the others wait here
    if error is not None:
        raise error
    if not ok:
        raise UserError(f"process 0 failed to {what} (its own output says why)")


def _tokenizer_texts(cfg: RunConfig):
    if cfg.data.pretrain_source == "builtin":
        from bart_jax.data import builtin_documents

        return builtin_documents()["train"]
    source = prepared_dataset(cfg, "pretrain")[cfg.data.train_split]
    return (as_text(source[i]["text"]) for i in range(len(source)))


def prepared_dataset(cfg: RunConfig, stage: str):
    """The prepared dataset (split -> random-access source) of a stage's data source."""
    from bart_jax.data import load_prepared, prepare_builtin

    source = cfg.data.pretrain_source if stage == "pretrain" else cfg.data.finetune_source
    if source == "builtin":
        directory, kind = os.path.join(cfg.workdir, "data"), "documents" if stage == "pretrain" else "pairs"
        if jax.process_count() > 1:  # the workdir is shared: one process builds it, then all open it
            in_process_zero(lambda: prepare_builtin(directory, kind), "prepare the built-in data")
        return prepare_builtin(directory, kind)
    if not os.path.isdir(source):
        raise ValueError(f"data.{stage}_source={source!r}: not 'builtin' nor a prepared dataset directory "
                         "(build one with `bart-jax data text|pairs`)")
    dataset = load_prepared(source)
    wanted = "text" if stage == "pretrain" else "pairs"
    if dataset.kind != wanted:  # (before anything reads a field the other kind lacks)
        names = {"text": "a text corpus", "pairs": "summarization pairs"}
        raise UserError(f"data.{stage}_source={source}: holds {names[dataset.kind]}, but {stage} reads "
                        f"{names[wanted]} (build them with `bart-jax data {wanted}`)")
    return dataset


def check_splits(cfg: RunConfig, stage: str, dataset) -> None:
    """Refuse (UserError) a dataset without the train split, or without the eval split when validating."""
    t = cfg.stage(stage).train
    splits = [cfg.data.train_split] + ([cfg.data.eval_split] if t.eval_every > 0 else [])
    missing = [s for s in splits if s not in dataset]
    if missing:
        raise UserError(f"the {stage} data {getattr(dataset, 'path', '')} has no split(s) {missing} (has "
                        f"{sorted(dataset)}); set data.train_split / data.eval_split, or eval_every=0")


def stage_batches(cfg: RunConfig, stage: str, tok, dataset, local_batch: int, split: str, *, shuffle: bool,
                  num_epochs=None, decoder_start_id: int | None = None):
    """The stage's batches of `split` for this process: its `data_shards`, stacked by `ShardGroup` when it
    reads more than one. Fine-tuning batches start the decoder with `decoder_start_id` (default </s>); their
    lengths are bucketed per shard, so processes' batches may differ in shape (the loop pads them to one)."""
    from bart_jax.data.loader import finetune_batches, pretrain_batches
    from bart_jax.data.multihost import ShardGroup

    t = cfg.stage(stage).train
    shards = data_shards(cfg, jax.process_index(), jax.process_count())
    num_shards = data_shard_count(cfg)
    if local_batch % len(shards):
        raise UserError(f"{stage}.train.batch_size={local_batch * jax.process_count()} does not split into "
                        f"{num_shards} data shards (data.shards) of equal rows")
    rows = local_batch // len(shards)

    def shard(index):
        if stage == "pretrain":
            return pretrain_batches(dataset[split], tok, seq_len=t.source_length, batch_size=rows,
                                    seed=cfg.data.shuffle_seed, shuffle=shuffle, num_epochs=num_epochs,
                                    num_workers=cfg.data.num_workers, process_index=index,
                                    process_count=num_shards)
        return finetune_batches(dataset[split], tok, max_source_len=t.source_length,
                                max_target_len=t.target_length, batch_size=rows, seed=cfg.data.shuffle_seed,
                                shuffle=shuffle, num_epochs=num_epochs, num_workers=cfg.data.num_workers,
                                decoder_start_id=decoder_start_id, process_index=index,
                                process_count=num_shards)

    if len(shards) == 1:
        return shard(shards[0])
    return ShardGroup([shard(i) for i in shards], tok.pad_id)


def data_shard_count(cfg: RunConfig) -> int:
    """How many shards each split is read as (`data.shards`, default one per process)."""
    return cfg.data.shards or jax.process_count()


def data_shards(cfg: RunConfig, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` reads (UserError when they do not divide)."""
    from bart_jax.data.multihost import process_shards

    try:
        return process_shards(data_shard_count(cfg), process_index, process_count)
    except ValueError as e:
        raise UserError(str(e)) from None


def noise_batch_fns(cfg: RunConfig, tok, decoder_start_id: int):
    """(train batch_fn, eval batch_fn) that noise {'tokens'} on device with keys from (seed, index); the
    decoder inputs start with `decoder_start_id` (the model's decoder_start_token_id), as fine-tuning's do."""
    from bart_jax import noise

    overrides = dict(cfg.noise.overrides)
    # The preset (or an override) says which tokens end sentences: fairseq's recipe splits at '.' only.
    split = overrides.get("sentence_split", noise.noise_preset(cfg.noise.preset).sentence_split)
    derived = dict(sentence_end_ids=tuple(tok.sentence_end_ids(split)), mask_id=tok.mask_id, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, eos_id=tok.eos_id, decoder_start_id=decoder_start_id)
    noise_cfg = noise.noise_preset(cfg.noise.preset, **{**derived, **overrides})
    word_starts = jnp.asarray(tok.word_start_table())
    seed = cfg.pretrain.train.seed

    def train_fn(batch, step):
        return noise.denoising_batch(noise.noise_key(seed, step), batch["tokens"], word_starts, noise_cfg)

    def eval_fn(batch, index):
        return noise.denoising_batch(noise.noise_key(seed + EVAL_NOISE_SEED_OFFSET, index), batch["tokens"],
                                     word_starts, noise_cfg)

    return train_fn, eval_fn

