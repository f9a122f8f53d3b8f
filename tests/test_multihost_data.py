"""How a multi-process run reads its data, checked in one process: the split is read as `data.shards` disjoint
shards, each process reading a contiguous block of them, and the global batches (each process's rows, padded to
one shape) are the same whatever the number of processes: fine-tuning length buckets included."""

import random

import jax
import numpy as np
import pytest

from bart_jax.data.multihost import ShardGroup, pad_batch, process_shards
from bart_jax.train import config as C
from bart_jax.train.inputs import stage_batches


@pytest.fixture(scope="module")
def pairs_and_tokenizer(tmp_path_factory):
    from bart_jax.data import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(80)]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n)) + "."

    pairs = [{"document": text(rng.randint(1, 25)), "summary": text(rng.randint(2, 20))} for _ in range(50)]
    corpus = tmp_path_factory.mktemp("tok") / "corpus.txt"
    corpus.write_text("\n".join(p["document"] for p in pairs) + "\n")
    return pairs, train_tokenizer([str(corpus)], 300, corpus.parent / "tok")


def _batches(pairs, tok, monkeypatch, process_index, process_count, steps, shards=4):
    cfg = C.load_config("tiny", [f"data.shards={shards}", "finetune.train.source_length=128",
                                 "finetune.train.target_length=32"])
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
    it = stage_batches(cfg, "finetune", tok, {"train": pairs}, 8 // process_count, "train", shuffle=True)
    return it, [next(it) for _ in range(steps)]


def _global(local_batches, pad_id):
    """One global batch from the processes' local batches, as the loop builds it (same_shape_everywhere)."""
    source = max(b["input_ids"].shape[1] for b in local_batches)
    target = max(b["labels"].shape[1] for b in local_batches)
    padded = [pad_batch(b, source, target, pad_id) for b in local_batches]
    return {k: np.concatenate([b[k] for b in padded]) for k in padded[0]}


def test_global_batches_do_not_depend_on_the_number_of_processes(pairs_and_tokenizer, monkeypatch):
    pairs, tok = pairs_and_tokenizer
    steps = 12
    _, alone = _batches(pairs, tok, monkeypatch, 0, 1, steps)
    per_process = [_batches(pairs, tok, monkeypatch, p, 2, steps)[1] for p in range(2)]
    for step in range(steps):
        together = _global([per_process[0][step], per_process[1][step]], tok.pad_id)
        assert together.keys() == alone[step].keys()
        for k in together:
            np.testing.assert_array_equal(together[k], alone[step][k], err_msg=f"step {step} {k}")
    # Lengths are still bucketed (not all padded to the maximum), and differ between the processes at times.
    assert len({b["input_ids"].shape[1] for b in alone}) > 1
    assert any(a["input_ids"].shape != b["input_ids"].shape for a, b in zip(*per_process))


def test_processes_read_disjoint_shards_that_cover_the_split():
    assert [list(process_shards(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    assert list(process_shards(2, 0, 1)) == [0, 1]
    with pytest.raises(ValueError, match="data.shards=3 must be a multiple of the number of processes"):
        process_shards(3, 0, 2)


def test_a_group_of_shards_resumes_where_it_stopped(pairs_and_tokenizer, monkeypatch):
    pairs, tok = pairs_and_tokenizer
    it, _ = _batches(pairs, tok, monkeypatch, 0, 1, 3)
    assert isinstance(it, ShardGroup)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh, _ = _batches(pairs, tok, monkeypatch, 0, 1, 0)
    fresh.set_state(state)
    for a, b in zip(expected, [next(fresh) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    fewer, _ = _batches(pairs, tok, monkeypatch, 0, 1, 0, shards=2)
    with pytest.raises(ValueError, match="the saved data position has 4 shards for this process, this run reads 2"):
        fewer.set_state(state)


def test_main_job_refuses_to_run_across_processes(tmp_path):
    from bart_jax.errors import UserError
    from bart_jax.pipeline import run_main_job

    with pytest.raises(UserError, match=r"^the main job runs in one process \(distributed.enabled=true given\)"):
        run_main_job(workdir=str(tmp_path / "job"), overrides=["distributed.enabled=true"])
    assert not (tmp_path / "job").exists()  # refused before any work
