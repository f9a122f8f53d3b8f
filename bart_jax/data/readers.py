"""Reading local corpus and pairs files: .txt / .jsonl / .json / .tsv, optionally gzipped, as UTF-8.

Bad input: undecodable bytes and malformed JSON raise ValueError naming file and line; a missing field
raises ValueError naming the field, file and line; empty documents or pairs are skipped and counted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from typing import Iterator


def _open_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline) of a UTF-8 file, gzip-decompressed when it ends .gz.

    Raises ValueError naming file and line at the first undecodable byte sequence.
    """
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: undecodable bytes (not UTF-8) at byte {e.start} of the "
                                     f"line: {raw[max(0, e.start - 10):e.start + 10]!r}") from None
                yield lineno, line.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip file after line {lineno} ({e}); "
                             "compress it again or give the uncompressed file") from None


def _file_kind(path: str) -> str:
    """'jsonl', 'tsv' or 'txt' from the file name (a trailing .gz is looked through)."""
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}.get(ext, "txt")


def _json_record(path: str, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
    return record


_PAIR_FIELDS = {"document", "summary"}


def _field(record: dict, field: str, path: str, lineno: int) -> str:
    if field not in record:
        hint = ""  # a file of the other kind, given where this one belongs
        if field == "text" and _PAIR_FIELDS <= set(record):
            hint = "; it looks like summarization pairs: build them with `bart-jax data pairs`"
        elif field in _PAIR_FIELDS and "text" in record:
            hint = "; it looks like a text corpus: build it with `bart-jax data text`"
        raise ValueError(f"{path}:{lineno}: missing field {field!r} (fields present: {sorted(record)}){hint}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def iter_text_documents(path: str, *, text_field: str = "text", blank_line_docs: bool = False,
                        stats: dict | None = None) -> Iterator[str]:
    """Documents of one corpus file.

    .txt: one document per line, or with `blank_line_docs` blank-line separated documents (lines kept,
    joined by '\\n'). .jsonl/.json: one JSON object per line, document in `text_field`. Any of these may be
    gzipped (.gz). Empty documents are skipped and counted in `stats['empty_documents']`;
    `stats['documents']` counts the ones yielded.
    """
    stats = {} if stats is None else stats
    stats.setdefault("documents", 0)
    stats.setdefault("empty_documents", 0)

    def emit(text):
        if text.strip():
            stats["documents"] += 1
            return True
        stats["empty_documents"] += 1
        return False

    kind = _file_kind(path)
    if kind == "tsv":
        raise ValueError(f"{path}: TSV files hold summarization pairs; use a .txt or .jsonl file for a corpus")
    if kind == "jsonl":
        for lineno, line in _open_lines(path):
            if line.strip():
                text = _field(_json_record(path, lineno, line), text_field, path, lineno)
                if emit(text):
                    yield text
        return
    if not blank_line_docs:
        for _, line in _open_lines(path):
            if emit(line):
                yield line
        return
    block = []
    for _, line in _open_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            stats["documents"] += 1
            block = []
    if block:
        stats["documents"] += 1
        yield "\n".join(block)


def iter_pairs(path: str, *, document_field: str = "document", summary_field: str = "summary",
               stats: dict | None = None) -> Iterator[dict]:
    """{'document', 'summary'} records of one JSON-lines (.jsonl/.json) or TSV (.tsv, header row naming the
    columns) file, optionally gzipped. Pairs with an empty document or summary are skipped and counted in
    `stats['empty_pairs']`; `stats['pairs']` counts the ones yielded.
    """
    stats = {} if stats is None else stats
    stats.setdefault("pairs", 0)
    stats.setdefault("empty_pairs", 0)
    kind = _file_kind(path)
    if kind == "txt":
        raise ValueError(f"{path}: summarization pairs must be .jsonl/.json or .tsv (optionally .gz)")
    if kind == "jsonl":
        records = ((n, _json_record(path, n, line)) for n, line in _open_lines(path) if line.strip())
    else:
        records = _tsv_records(path, (document_field, summary_field))
    for lineno, record in records:
        document = _field(record, document_field, path, lineno)
        summary = _field(record, summary_field, path, lineno)
        if document.strip() and summary.strip():
            stats["pairs"] += 1
            yield {"document": document, "summary": summary}
        else:
            stats["empty_pairs"] += 1


def _tsv_records(path: str, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    lines = _open_lines(path)
    try:
        _, header_line = next(lines)
    except StopIteration:
        return
    header = header_line.split("\t")
    missing = [f for f in fields if f not in header]
    if missing:
        raise ValueError(f"{path}:1: the first line of a TSV file is its header row naming the columns "
                         f"(e.g. 'document<TAB>summary'); it is {header_line[:80]!r}, without {missing}")
    for lineno, line in lines:
        if not line.strip():
            continue
        values = next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(values) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(values)} tab-separated columns, header has "
                             f"{len(header)} ({header})")
        yield lineno, dict(zip(header, values))
