"""Input pipelines on grain: tokenize, pack / bucket, batch, shard across hosts, resume exactly.

    it = pretrain_batches(source, tok, seq_len=512, batch_size=8, seed=0)
    batch = next(it)                 # {'tokens': int32 [8, 512]}: rows `<s> text </s> pad...`
    state = it.get_state()           # JSON-serializable; store it in the checkpoint
    it.set_state(state)              # resume at exactly the next batch

Pipeline (both loaders): the process's shard of example indices -> epoch-reshuffled (grain's index
shuffle, a new permutation per epoch) -> per-example map (read + tokenize; runs in grain's read threads
and, with `num_workers`, worker processes) -> flat map (a document's blocks, or a window's length-sorted
batches) -> batch. The map is one-to-one and everything order-dependent runs after it in the main
process, so the output depends on the seed only, never on the number of threads or workers. The state is
grain's iterator state: the flat map stores the parent position of its current element plus how many of
its outputs were consumed, and recomputes that element on restore.

Sharding: shard p of P reads examples p, p+P, p+2P, ... (by default one shard per process; a process may read
several shards, stacked by `bart_jax.data.multihost.ShardGroup`, so the global batches do not depend on the
number of processes). Shards are padded to equal size with empty placeholders (ceil(N/P) each), so with finite
epochs every process yields the same number of fine-tuning batches and collectives never wait on a process that
ran out; placeholders yield no pretraining rows and all-pad fine-tuning targets (no loss).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from bart_jax.data.text import as_text, bucket_boundaries, padded_length, split_sentences

_PLACEHOLDER = -1  # example id of shard/batch padding


def _field_text(value, field: str | None) -> str:
    """The text of a record's `field` (or of the record itself when `field` is None)."""
    if field is not None:
        if not isinstance(value, Mapping) or field not in value:
            raise ValueError(f"example has no field {field!r} (got {type(value).__name__}"
                             f"{' with fields ' + str(sorted(value)) if isinstance(value, Mapping) else ''})")
        value = value[field]
    return as_text(value)


def _local_count(num_examples: int, process_count: int) -> int:
    return -(-num_examples // process_count)


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _index_dataset(num_examples: int, process_index: int, process_count: int, seed: int, shuffle: bool,
                   num_epochs: int | None) -> grain.MapDataset:
    """Local positions 0..ceil(N/P)-1 of this process's shard, shuffled per epoch, repeated."""
    if num_examples == 0:
        raise ValueError("the data source is empty")
    ds = grain.MapDataset.range(_local_count(num_examples, process_count))
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    return ds.repeat(num_epochs)


@dataclasses.dataclass(frozen=True)
class _ShardReader:
    """Local position -> (global example id, record), or (-1, None) for a shard-padding placeholder."""

    source: Any
    process_index: int
    process_count: int

    def __call__(self, local_position: int):
        example_id = self.process_index + int(local_position) * self.process_count
        if example_id >= len(self.source):
            return _PLACEHOLDER, None
        return example_id, self.source[example_id]


def _to_iter(ds: grain.MapDataset, read_threads: int, num_workers: int) -> grain.IterDataset:
    """`ds` read by `read_threads` threads, and by `num_workers` worker processes when that is > 0."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=64))
    if num_workers > 0:
        from absl import flags

        # grain's worker processes read absl flags, which only absl.app parses; outside it use the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


# ------------------------------------------------------------------------------------------ pretraining

def pack_document(sentence_ids: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
                  pad_id: int) -> np.ndarray:
    """Packs one document's tokenized sentences into rows `<s> tokens </s> pad...`: int32 [n_blocks, seq_len].

    Whole sentences are packed greedily (fairseq's complete_doc) into at most seq_len - 2 tokens per row;
    a sentence longer than that is cut into pieces. Rows never mix documents; an empty document gives
    zero rows.
    """
    capacity = seq_len - 2
    if capacity < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room between <s> and </s>")
    blocks, current = [], []
    for ids in sentence_ids:
        ids = list(ids)
        if not ids:
            continue
        if len(current) + len(ids) > capacity and current:
            blocks.append(current)
            current = []
        while len(ids) > capacity:  # only a sentence longer than a whole block is split
            blocks.append(ids[:capacity])
            ids = ids[capacity:]
        current = current + ids
    if current:
        blocks.append(current)
    rows = np.full((len(blocks), seq_len), pad_id, dtype=np.int32)
    for row, ids in zip(rows, blocks):
        row[0], row[1:len(ids) + 1], row[len(ids) + 1] = bos_id, ids, eos_id
    return rows


@dataclasses.dataclass(frozen=True)
class _DocumentToRows:
    """(example id, record) -> int32 [n_blocks, seq_len] (see `pack_document`)."""

    tokenizer: Any
    seq_len: int
    field: str | None

    def __call__(self, item) -> np.ndarray:
        example_id, record = item
        tok = self.tokenizer
        if example_id == _PLACEHOLDER:
            return np.zeros((0, self.seq_len), np.int32)
        sentences = split_sentences(_field_text(record, self.field))
        # A space before every sentence but the first encodes it as it would be inside the running text
        # (byte-level BPE marks word starts with the space; SentencePiece ignores leading spaces).
        sentences = sentences[:1] + [" " + s for s in sentences[1:]]
        ids = tok.encode_batch(sentences, add_special_tokens=False) if sentences else []
        return pack_document(ids, self.seq_len, tok.bos_id, tok.eos_id, tok.pad_id)


class _Rows(grain.experimental.FlatMapTransform):
    """[n, L] -> its n rows (n may be 0)."""

    max_fan_out = 1 << 20

    def flat_map(self, element):
        return element


@dataclasses.dataclass(frozen=True)
class _StackRows:
    """Rows -> {'tokens': int32 [batch_size, L]}, a short final batch completed with all-pad rows."""

    batch_size: int
    pad_id: int

    def __call__(self, rows):
        tokens = np.full((self.batch_size, rows[0].shape[0]), self.pad_id, np.int32)
        tokens[:len(rows)] = np.stack(rows)
        return {"tokens": tokens}


def pretrain_batches(source, tokenizer, *, seq_len: int = 512, batch_size: int, seed: int = 0,
                     num_epochs: int | None = None, shuffle: bool = True, field: str | None = "text",
                     process_index: int | None = None, process_count: int | None = None,
                     read_threads: int = 2, num_workers: int = 0) -> grain.DatasetIterator:
    """Packed pretraining rows of this process's shard.

    source: random-access documents (len + getitem), e.g. `prepare_text_corpus(...)['train']` whose
      elements are {'text': bytes}; with `field=None` the elements are the texts themselves (str/bytes).
    Yields {'tokens': int32 [batch_size, seq_len]}: each row `<s> tokens </s>` then pad, from one document
      (see `pack_document`). With finite `num_epochs` the last batch is completed with all-pad rows; processes
      may then yield different numbers of batches (documents make different numbers of rows), so for
      multi-host evaluation take a fixed number of batches from `num_epochs=None` instead.
    seed: shuffle seed (a new permutation every epoch). process_index/process_count default to JAX's.
    read_threads: threads reading + tokenizing; num_workers > 0 adds that many worker processes.
    Returns a grain DatasetIterator: `next(it)`, `it.get_state()`, `it.set_state(state)`.
    """
    process_index, process_count = _process_shard(process_index, process_count)
    ds = _index_dataset(len(source), process_index, process_count, seed, shuffle, num_epochs)
    ds = ds.map(_ShardReader(source, process_index, process_count))
    ds = ds.map(_DocumentToRows(tokenizer, seq_len, field))
    it = _to_iter(ds, read_threads, num_workers)
    it = grain.experimental.FlatMapIterDataset(it, _Rows())
    it = it.batch(batch_size, batch_fn=_StackRows(batch_size, tokenizer.pad_id))
    return iter(it)


# ------------------------------------------------------------------------------------------ fine-tuning

def _truncate(ids: list[int], max_len: int, eos_id: int) -> list[int]:
    """Keeps the first max_len tokens, ending in </s> as the untruncated sequence does."""
    return ids if len(ids) <= max_len else ids[:max_len - 1] + [eos_id]


@dataclasses.dataclass(frozen=True)
class _EncodePair:
    """(example id, record) -> {'id', 'source', 'target'}: token id lists `<s> ... </s>`, truncated."""

    tokenizer: Any
    max_source_len: int
    max_target_len: int
    document_field: str
    summary_field: str

    def __call__(self, item):
        example_id, record = item
        tok = self.tokenizer
        if example_id == _PLACEHOLDER:
            return {"id": _PLACEHOLDER, "source": [tok.bos_id, tok.eos_id], "target": []}
        # Only a prefix can survive truncation. A token covers at most 16 (SentencePiece) or a few dozen
        # (GPT-2: runs of '=' or '-') characters, so cutting the text at 64 characters per kept token saves
        # tokenizing huge documents without changing the kept tokens.
        document = _field_text(record, self.document_field)[:64 * self.max_source_len + 1024]
        summary = _field_text(record, self.summary_field)[:64 * self.max_target_len + 1024]
        source, target = tok.encode_batch([document, summary])
        return {"id": example_id, "source": _truncate(source, self.max_source_len, tok.eos_id),
                "target": _truncate(target, self.max_target_len, tok.eos_id)}


@dataclasses.dataclass(frozen=True)
class _BucketWindow(grain.experimental.FlatMapTransform):
    """A window of encoded examples -> its model batches.

    The window is sorted by length and cut into batches, each padded to the smallest bucket boundary that
    fits it (few distinct shapes -> few recompiles; similar lengths -> little padding); the batch order is
    then shuffled with a generator seeded by the window's contents, so it is reproducible.
    """

    batch_size: int
    source_boundaries: tuple[int, ...]
    target_boundaries: tuple[int, ...]
    pad_id: int
    bos_id: int
    eos_id: int
    decoder_start_id: int
    seed: int
    shuffle: bool
    return_example_ids: bool
    max_fan_out: int = 1 << 16

    def flat_map(self, window):
        order = sorted(range(len(window)),
                       key=lambda i: (len(window[i]["source"]), len(window[i]["target"]), window[i]["id"]))
        groups = [[window[i] for i in order[s:s + self.batch_size]]
                  for s in range(0, len(order), self.batch_size)]
        if self.shuffle and len(groups) > 1:
            ids = np.asarray([ex["id"] for ex in window], np.int64)
            rng = np.random.default_rng([self.seed % 2**32, zlib.crc32(ids.tobytes())])
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return [self._batch(g) for g in groups]

    def _batch(self, examples):
        n = self.batch_size
        src_len = padded_length(max(len(ex["source"]) for ex in examples), self.source_boundaries)
        tgt_len = padded_length(max([len(ex["target"]) for ex in examples] + [1]), self.target_boundaries)
        input_ids = np.full((n, src_len), self.pad_id, np.int32)
        labels = np.full((n, tgt_len), self.pad_id, np.int32)
        example_ids = np.full((n,), _PLACEHOLDER, np.int32)
        # Batch padding rows get a 2-token source `<s> </s>` (no fully masked attention row) and no targets.
        input_ids[len(examples):, :2] = (self.bos_id, self.eos_id)
        for row, ex in enumerate(examples):
            input_ids[row, :len(ex["source"])] = ex["source"]
            labels[row, :len(ex["target"])] = ex["target"]
            example_ids[row] = ex["id"]
        from bart_jax.model import decoder_inputs  # NumPy in, NumPy out: the pipeline stays off the accelerator

        batch = {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.pad_id).astype(np.int32),
            **decoder_inputs(labels, self.pad_id, self.decoder_start_id),
            "labels": labels,
        }
        if self.return_example_ids:
            batch["example_id"] = example_ids
        return batch


def finetune_batches(source, tokenizer, *, max_source_len: int = 1024, max_target_len: int = 128,
                     batch_size: int, seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
                     bucket: bool = True, bucket_window: int = 32,
                     source_boundaries: Sequence[int] | None = None,
                     target_boundaries: Sequence[int] | None = None,
                     document_field: str = "document", summary_field: str = "summary",
                     return_example_ids: bool = False, process_index: int | None = None,
                     process_count: int | None = None, read_threads: int = 2,
                     num_workers: int = 0, decoder_start_id: int | None = None) -> grain.DatasetIterator:
    """Model batches of document -> summary pairs from this process's shard.

    source: random-access pairs, e.g. `prepare_pairs(...)['train']` ({'document': bytes, 'summary': bytes}).
    Yields the model batch dict (int32): 'input_ids' [B, S], 'attention_mask' [B, S], 'decoder_input_ids'
      [B, T] (= shift_tokens_right(labels), starting with `decoder_start_id`: the model's
      decoder_start_token_id; None: the tokenizer's </s>, BART's), 'decoder_attention_mask' [B, T], 'labels'
      [B, T] (`<s> summary </s>` then pad); plus 'example_id' int32 [B] (source index, -1 for padding rows)
      when `return_example_ids`. Sources/targets are truncated to max_source_len/max_target_len (keeping
      the final </s>).
    bucket: windows of `bucket_window` batches are sorted by length, cut into batches and padded to the
      smallest of `source_boundaries`/`target_boundaries` (default powers of two up to the max lengths)
      that fits; without it every batch is padded to (max_source_len, max_target_len).
    With finite `num_epochs` every process yields the same number of batches; the last one is completed
      with padding rows (source `<s> </s>`, all-pad labels: no loss).
    Returns a grain DatasetIterator: `next(it)`, `it.get_state()`, `it.set_state(state)`.
    """
    process_index, process_count = _process_shard(process_index, process_count)
    if bucket:
        source_boundaries = tuple(source_boundaries or bucket_boundaries(max_source_len))
        target_boundaries = tuple(target_boundaries or bucket_boundaries(max_target_len))
        window = batch_size * bucket_window
    else:
        source_boundaries, target_boundaries, window = (max_source_len,), (max_target_len,), batch_size
    if source_boundaries[-1] < max_source_len or target_boundaries[-1] < max_target_len:
        raise ValueError(f"bucket boundaries {source_boundaries} / {target_boundaries} must reach the max "
                         f"lengths {max_source_len} / {max_target_len}")
    ds = _index_dataset(len(source), process_index, process_count, seed, shuffle, num_epochs)
    ds = ds.map(_ShardReader(source, process_index, process_count))
    ds = ds.map(_EncodePair(tokenizer, max_source_len, max_target_len, document_field, summary_field))
    it = _to_iter(ds, read_threads, num_workers)
    it = it.batch(window, batch_fn=list)
    it = grain.experimental.FlatMapIterDataset(it, _BucketWindow(
        batch_size, source_boundaries, target_boundaries, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
        tokenizer.eos_id if decoder_start_id is None else decoder_start_id, seed, shuffle, return_example_ids))
    return iter(it)
