"""What generation and evaluation read and write: a model with its tokenizer, documents, summarization
pairs, and predictions files (JSON lines `{'document', 'reference', 'prediction'}`)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from typing import Iterable, Iterator, Sequence


def load_model_for_inference(path, tokenizer_path=None, **config_overrides):
    """(config, params, tokenizer) for generation from a checkpoint directory.

    Supported now: whatever `bart_jax.from_pretrained` reads (Hugging Face directory, fairseq model.pt,
    bart_jax model directory). Training checkpoints (orbax) are to be added here. The tokenizer is loaded
    from `tokenizer_path` (default: the checkpoint directory) with `load_tokenizer`.
    """
    from bart_jax.convert import from_pretrained
    from bart_jax.data.tokenizer import load_tokenizer

    config, params = from_pretrained(path, **config_overrides)
    tokenizer_path = tokenizer_path or (path if os.path.isdir(path) else os.path.dirname(path))
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; pass --tokenizer") from e
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer at {tokenizer_path} has {tokenizer.vocab_size} ids but the model at {path} "
                         f"only {config.vocab_size}: they do not belong together")
    return config, params, tokenizer


def read_documents(path: str, field: str) -> Iterator[str]:
    """Documents of a file (or '-' for stdin): one per line, or the `field` of each JSON line for .jsonl."""
    jsonl = path.endswith(".jsonl")
    with contextlib.ExitStack() as stack:
        stream = sys.stdin if path == "-" else stack.enter_context(open(path, encoding="utf-8"))
        for lineno, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if not jsonl:
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} (use --text-field)")
            yield str(record[field])


def count_documents(path: str) -> int | None:
    """How many documents `read_documents` will yield from `path` (None for stdin)."""
    if path == "-":
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if not path.endswith(".jsonl") or line.strip())


def read_pairs(data: str, split: str, limit: int | None = None) -> list[dict]:
    """{'document', 'summary'} pairs: `data` is a prepared summarization_pairs dataset directory (read
    split `split`) or a pairs file (.jsonl/.json/.tsv, optionally .gz)."""
    from bart_jax.data.datasets import load_prepared
    from bart_jax.data.readers import iter_pairs
    from bart_jax.data.text import as_text

    if os.path.isdir(data):
        prepared = load_prepared(data)
        if split not in prepared:
            raise ValueError(f"--data {data}: no split {split!r} (has {sorted(prepared)}); choose one with --split")
        source = prepared[split]
        n = len(source) if limit is None else min(limit, len(source))
        return [{"document": as_text(source[i]["document"]), "summary": as_text(source[i]["summary"])}
                for i in range(n)]
    if not os.path.isfile(data):
        raise ValueError(f"--data {data}: no such dataset directory or pairs file")
    return list(itertools.islice(iter_pairs(data), limit))


def write_predictions(path: str, pairs: Sequence[dict], predictions: Iterable[str]) -> list[str]:
    """Write one JSON line `{'document', 'reference', 'prediction'}` per pair, each as its prediction
    arrives (flushed, so an interrupted run keeps what it made); returns the predictions."""
    written = []
    with open(path, "w", encoding="utf-8") as f:
        for pair, prediction in zip(pairs, predictions):
            f.write(json.dumps({"document": pair["document"], "reference": pair["summary"],
                                "prediction": prediction}) + "\n")
            f.flush()
            written.append(prediction)
    return written
