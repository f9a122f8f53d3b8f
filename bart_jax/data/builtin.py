"""Built-in offline corpus: documentation text harvested from the running interpreter's standard library.

Every machine with Python has it, so pretraining and fine-tuning work with no download. Sources:
  * docstrings of modules, classes and functions, read with `ast` from the stdlib `.py` files (nothing is
    imported or executed), skipping test suites, site-packages, the generated `encodings` codecs and
    `__pycache__`;
  * the language-reference topics Python ships for `help()` (`pydoc_data/topics.py`, read with `ast`).

Pretraining documents: per source module (or pydoc topic) and split, its docstrings in source order, one
cleaned paragraph per line. Summarization pairs: for each docstring with a body, document = the body
(paragraphs after the first) and summary = the first paragraph (the one-line summary).

Splits are decided per docstring by a stable hash of its one-line summary (train 80%, validation 10%,
test 10%), for documents and pairs alike, so no validation/test summary is seen in pretraining text.
Exact duplicates (after cleaning) are dropped, keeping the first in a sorted walk: the output is a pure
function of the stdlib files, identical on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import re
import sysconfig

SPLITS = ("train", "validation", "test")
# Per-mille boundaries of the hash buckets: [0, 800) train, [800, 900) validation, [900, 1000) test;
# 10% held out gives a few hundred test pairs, enough for a stable ROUGE.
_SPLIT_EDGES = ((800, "train"), (900, "validation"), (1000, "test"))
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "encodings", "__phello__", "lib-dynload"})
# Pair filters (in words): a summary is one short sentence; a body has enough text to summarize but fits
# a 1024-token encoder comfortably.
_SUMMARY_WORDS = (3, 40)
_BODY_WORDS = (10, 400)

# Lines made only of decoration (title underlines, table borders such as '----- ----').
_RULE_LINE = re.compile(r"^[\s\-=*~^#+_.`'\"|]*[\-=*~^#+_.`'\"|]{3}[\s\-=*~^#+_.`'\"|]*$")
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """The harvested corpus.

    documents: split -> list of documents (str, one paragraph per line).
    pairs: split -> list of {'document': str, 'summary': str}.
    stats: counts (files parsed, files skipped for syntax errors, docstrings, duplicates dropped, ...).
    """

    documents: dict
    pairs: dict
    stats: dict


def split_of(key: str) -> str:
    """Deterministic split ('train'|'validation'|'test') of a stable string key (hash-based, 80/10/10)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000
    return next(name for edge, name in _SPLIT_EDGES if bucket < edge)


def clean_paragraphs(text: str) -> list[str]:
    """Splits documentation text into cleaned paragraphs.

    Paragraphs are separated by blank lines; each is whitespace-collapsed to one line. Title underlines
    (`*****`, `=====`), and interactive-session examples (`>>>` paragraphs) are dropped: they are not prose.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if not _RULE_LINE.match(line)]
        if not lines or lines[0].lstrip().startswith(">>>"):
            continue
        paragraph = _WHITESPACE.sub(" ", " ".join(lines)).strip()
        if paragraph:
            paragraphs.append(paragraph)
    return paragraphs


def _stdlib_files(stdlib_dir: str) -> list[str]:
    """Relative paths of the stdlib .py files to harvest, sorted (deterministic walk)."""
    found = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        rel_root = os.path.relpath(root, stdlib_dir)
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(os.path.normpath(os.path.join(rel_root, name)))
    return sorted(found)


def _docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """(qualified name, raw cleaned docstring) of the module, its classes and functions, in source order."""
    found = []
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        found.append(("<module>", module_doc))

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    found.append((name, doc))
                visit(child, name + ".")

    visit(tree, "")
    return found


def _pydoc_topics(path: str) -> list[tuple[str, str]]:
    """(topic name, text) from pydoc_data/topics.py, read as a literal without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return sorted(topics.items())
    return []


def _make_pair(paragraphs: list[str]) -> dict | None:
    """{'document', 'summary'} from a docstring's paragraphs, or None when it does not make a good pair."""
    if len(paragraphs) < 2:
        return None
    summary, body = paragraphs[0], " ".join(paragraphs[1:])
    n_summary, n_body = len(summary.split()), len(body.split())
    if not (_SUMMARY_WORDS[0] <= n_summary <= _SUMMARY_WORDS[1]) or summary.endswith(":"):
        return None
    if not (_BODY_WORDS[0] <= n_body <= _BODY_WORDS[1]):
        return None
    return {"document": body, "summary": summary}


@functools.lru_cache(maxsize=4)
def harvest_stdlib_docs(stdlib_dir: str | None = None) -> BuiltinCorpus:
    """Harvests the built-in corpus from `stdlib_dir` (default: the running interpreter's stdlib).

    Pure function of the files (cached per process: parsing the stdlib takes a few seconds).
    """
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    stats = {"stdlib_dir": stdlib_dir, "files_parsed": 0, "files_unparsable": 0, "docstrings": 0,
             "duplicate_docstrings": 0, "pydoc_topics": 0}
    # unit = (split key, source name, paragraphs); documents group units by (source, split).
    units = []
    for rel in _stdlib_files(stdlib_dir):
        path = os.path.join(stdlib_dir, rel)
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, UnicodeDecodeError):
            stats["files_unparsable"] += 1  # e.g. deliberately broken lib2to3 data files
            continue
        stats["files_parsed"] += 1
        module = rel[:-3].replace(os.sep, ".")
        for _, doc in _docstrings(tree):
            paragraphs = clean_paragraphs(doc)
            # Split by the one-line summary, so docstrings sharing it (overrides, re-implementations) land
            # in one split and no held-out summary is pretraining text.
            units.append((paragraphs[0] if paragraphs else "", module, paragraphs, True))
    topics_path = os.path.join(stdlib_dir, "pydoc_data", "topics.py")
    if os.path.exists(topics_path):
        for name, text in _pydoc_topics(topics_path):
            stats["pydoc_topics"] += 1
            units.append((f"pydoc_data.topics:{name}", f"pydoc_data.topics:{name}", clean_paragraphs(text),
                          False))

    seen_docs, seen_pairs = set(), set()
    documents = {split: {} for split in SPLITS}  # split -> source -> paragraphs (insertion-ordered)
    pairs = {split: [] for split in SPLITS}
    for key, source, paragraphs, is_docstring in units:
        if not paragraphs:
            continue
        stats["docstrings"] += is_docstring
        text = "\n".join(paragraphs)
        if text in seen_docs:
            stats["duplicate_docstrings"] += 1
            continue
        seen_docs.add(text)
        split = split_of(key)
        documents[split].setdefault(source, []).extend(paragraphs)
        pair = _make_pair(paragraphs) if is_docstring else None
        if pair is not None and pair["document"] not in seen_pairs and pair["summary"] not in seen_pairs:
            seen_pairs.update((pair["document"], pair["summary"]))
            pairs[split].append((pair, paragraphs[1:]))
    # A held-out pair whose body shares a paragraph with training text (copied docstrings) would be partly
    # seen in pretraining: drop it.
    train_paragraphs = {p for by_source in documents["train"].values() for p in by_source}
    stats["heldout_pairs_overlapping_train"] = 0
    for split in SPLITS:
        kept = [pair for pair, body in pairs[split]
                if split == "train" or not any(p in train_paragraphs for p in body)]
        stats["heldout_pairs_overlapping_train"] += len(pairs[split]) - len(kept)
        pairs[split] = kept
    documents = {split: ["\n".join(p) for p in by_source.values()] for split, by_source in documents.items()}
    stats.update({f"documents_{s}": len(documents[s]) for s in SPLITS})
    stats.update({f"pairs_{s}": len(pairs[s]) for s in SPLITS})
    stats["characters_train"] = sum(len(d) for d in documents["train"])
    return BuiltinCorpus(documents=documents, pairs=pairs, stats=stats)


def builtin_documents() -> dict[str, list[str]]:
    """Pretraining documents of the built-in corpus: {'train'|'validation'|'test': [str, ...]}.

    Each document is one module's (or pydoc topic's) documentation, one paragraph per line.
    """
    return harvest_stdlib_docs().documents


def builtin_pairs() -> dict[str, list[dict]]:
    """Summarization pairs of the built-in corpus: {split: [{'document': body, 'summary': one-liner}]}."""
    return harvest_stdlib_docs().pairs
