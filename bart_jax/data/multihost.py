"""Batches across processes: which data shards a process reads, its shards' batches stacked into its rows, and
those rows turned into global arrays.

    shards = process_shards(num_shards=4, process_index=1, process_count=2)          # range(2, 4)
    it = ShardGroup([finetune_batches(..., process_index=i, process_count=4) for i in shards], tok.pad_id)
    global_batch = to_global_batch(next(it), sharding)   # dict of jax.Array, ready for a jitted step

A split is read as a fixed number of shards (`bart_jax.data.loader` reads one); each process reads a
contiguous block of them, so the global batch (every process's rows, in process order) is the same on any
number of processes. Fine-tuning batches bucket their lengths per shard, so shards' batches are padded to one
shape (`pad_batch`) before they are stacked or made global.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # only for annotations: stacking and padding run on NumPy alone
    import grain


def process_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards of `num_shards` that process `process_index` of `process_count` reads: a contiguous block,
    so the processes' rows of a global batch come in shard order."""
    if num_shards % process_count:
        raise ValueError(f"data.shards={num_shards} must be a multiple of the number of processes ({process_count})")
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


class ShardGroup:
    """Several shards of the data read together by one process: each batch is the shards' batches stacked
    row-wise in shard order (`stack_batches`). Reading the data as a fixed number of shards, however many
    processes share them, gives the same global batches on any number of processes.

    A grain-checkpointable iterator: `get_state()` is JSON bytes holding every shard's state.
    """

    def __init__(self, iterators: Sequence[grain.DatasetIterator], pad_id: int):
        self.iterators, self.pad_id = list(iterators), pad_id

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return stack_batches([next(it) for it in self.iterators], self.pad_id)

    def get_state(self) -> bytes:
        return json.dumps({"shards": [it.get_state() for it in self.iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        shards = json.loads(state)["shards"]
        if len(shards) != len(self.iterators):
            raise ValueError(f"the saved data position has {len(shards)} shards for this process, this run reads "
                             f"{len(self.iterators)} (data.shards or the number of processes changed)")
        for it, shard_state in zip(self.iterators, shards):
            it.set_state(shard_state)

    def start_prefetch(self) -> None:
        for it in self.iterators:
            getattr(it, "start_prefetch", lambda: None)()


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]], pad_id: int) -> dict:
    """Batches stacked row-wise in order; fine-tuning batches are first padded to the longest (`pad_batch`)."""
    if "input_ids" in batches[0]:
        source = max(b["input_ids"].shape[1] for b in batches)
        target = max(b["labels"].shape[1] for b in batches)
        batches = [pad_batch(b, source, target, pad_id) for b in batches]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# Fine-tuning batch keys with a length axis, and the value their padding takes ('pad': the pad id).
_SOURCE_KEYS = {"input_ids": "pad", "attention_mask": 0}
_TARGET_KEYS = {"decoder_input_ids": "pad", "decoder_attention_mask": 0, "labels": "pad"}


def pad_batch(batch: Mapping[str, np.ndarray], source_length: int, target_length: int, pad_id: int) -> dict:
    """A fine-tuning batch padded at the end of its length axes to [B, source_length] / [B, target_length]
    (ids with `pad_id`, masks with 0: the padding is masked, so the loss is unchanged). Other keys as given."""
    out = dict(batch)
    for keys, length in ((_SOURCE_KEYS, source_length), (_TARGET_KEYS, target_length)):
        for key, fill in keys.items():
            if key in out and out[key].shape[1] < length:
                value = np.asarray(out[key])
                padded = np.full((value.shape[0], length), pad_id if fill == "pad" else fill, value.dtype)
                padded[:, :value.shape[1]] = value
                out[key] = padded
    return out


def to_global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict:
    """This process's batch -> dict of global jax.Arrays (batch axis = all processes' rows, in process order).

    sharding: a jax.sharding.NamedSharding for the batch (its spec's first entry shards the batch axis;
      it is cut to each array's rank), or a dict key -> Sharding. Uses
      jax.make_array_from_process_local_data, so each process passes only its own rows.
    """
    import jax

    out = {}
    for key, value in local_batch.items():
        s = sharding[key] if isinstance(sharding, Mapping) else sharding
        value = np.asarray(value)
        if isinstance(s, jax.sharding.NamedSharding) and len(s.spec) > value.ndim:
            s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[:value.ndim]))
        out[key] = jax.make_array_from_process_local_data(s, value)
    return out
