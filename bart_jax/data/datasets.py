"""Datasets as tensorflow-datasets builders writing array_record files (TensorFlow is not needed).

Three builders, each prepared into a `data_dir` once and then read by random access (grain):
  * `text_corpus` — local .txt / .jsonl / .gz files, one document per line (or blank-line separated),
    for pretraining. Features: {'text'}.
  * `summarization_pairs` — local JSON lines or TSV files with configurable document/summary field names,
    train/validation/test splits, for fine-tuning and evaluation. Features: {'document', 'summary'}.
  * `stdlib_docs` — the built-in offline corpus (`bart_jax.data.builtin`), config 'documents' (like
    text_corpus) or 'pairs' (like summarization_pairs), splits train/validation/test.

Plain functions build and load them: `prepare_text_corpus`, `prepare_pairs`, `prepare_builtin`,
`load_prepared`; each returns a `PreparedDataset` (split -> tfds ArrayRecordDataSource, plus the input
statistics such as how many empty documents were skipped). Text features read back as UTF-8 `bytes`.

Input files are parsed by `bart_jax.data.readers` (bad input raises ValueError naming file and line; empty
documents are skipped and counted in `stats['empty_documents']`). Prepare on one process per file system (e.g. `jax.process_index() == 0` with a shared
data_dir), then `load_prepared` everywhere.

CLI: `bart-jax data text|pairs|builtin ...` (bart_jax.cli.data).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys

import tensorflow_datasets as tfds

from bart_jax.data.builtin import SPLITS
from bart_jax.data.readers import iter_pairs, iter_text_documents

_VERSION = "1.0.0"
_HASH_CHUNK = 1 << 20  # files are hashed in 1 MiB reads, so a corpus never has to fit in memory


def _fingerprint(*parts) -> str:
    """Identity of a dataset's inputs and options."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_fingerprint(split_paths: dict) -> list:
    # By content, not name + size: an input edited in place (even to the same byte count) is a new dataset.
    return [(split, os.path.basename(p), file_sha256(p)) for split, paths in sorted(split_paths.items())
            for p in paths]


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """split -> files, and how to read them (see `iter_text_documents`)."""

    split_paths: dict = dataclasses.field(default_factory=dict)
    text_field: str = "text"
    blank_line_docs: bool = False
    holdout_every: int = 0


@dataclasses.dataclass(eq=False)
class PairsConfig(tfds.core.BuilderConfig):
    """split -> files, and the document/summary field (or TSV column) names."""

    split_paths: dict = dataclasses.field(default_factory=dict)
    document_field: str = "document"
    summary_field: str = "summary"
    holdout_every: int = 0


def _text_features():
    return tfds.features.FeaturesDict({"text": tfds.features.Text()})


def _pair_features():
    return tfds.features.FeaturesDict({"document": tfds.features.Text(), "summary": tfds.features.Text()})


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: DatasetInfo built directly (no package metadata files), stats into metadata.json."""

    VERSION = tfds.core.Version(_VERSION)

    def _features(self):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=self._features(), metadata=tfds.core.MetadataDict())

    def _record_stats(self, split: str, stats: dict):
        self.info.metadata.setdefault("stats", {})[split] = dict(stats)


class _LocalFilesBuilder(_Builder):
    """Examples read from the local files of each split (config `split_paths`); `_read` parses one file.

    With config `holdout_every` = n > 0, the validation split is every n-th training example (the first
    included) and the train split the others: a corpus given as one set of files still gets a validation
    split, disjoint from what is trained on.
    """

    COUNT_KEY = "examples"  # the stats key `_read` counts yielded examples under

    def _read(self, path: str, stats: dict):
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        every = cfg.holdout_every
        generators = {split: self._generate_examples(split, paths)
                      for split, paths in cfg.split_paths.items()}
        if every:
            train = cfg.split_paths["train"]
            generators["train"] = self._generate_examples("train", train, lambda n: n % every != 0)
            generators["validation"] = self._generate_examples("validation", train, lambda n: n % every == 0)
        return generators

    def _generate_examples(self, split, paths, select=None):
        """Examples of `paths` in file order; with `select`, only those whose running index it accepts."""
        stats = {}
        count = 0
        index = -1
        for file_index, path in enumerate(paths):
            for example_index, example in enumerate(self._read(path, stats)):
                index += 1
                if select is not None and not select(index):
                    continue
                count += 1
                yield f"{file_index}:{example_index}", example
        if count == 0:  # TFDS would fail on it with an AssertionError
            from bart_jax.errors import UserError

            if index >= 0:  # examples were read, all of them for the other split
                raise UserError(f"split {split!r}: the {index + 1} example(s) of {', '.join(paths)} all went "
                                f"to the held-out validation split; give more data or --holdout-every 0")
            skipped = {k: v for k, v in stats.items() if v}
            raise UserError(f"split {split!r}: no non-empty examples in {', '.join(paths)}"
                            + (f" (skipped: {skipped})" if skipped else " (the files are empty)"))
        if select is not None:  # the reader counted every example of the files, not this split's share
            stats = {self.COUNT_KEY: count, "held_out_every": self.builder_config.holdout_every}
        self._record_stats(split, stats)


class TextCorpus(_LocalFilesBuilder):
    """Pretraining documents from local files. Features: {'text': Text}."""

    COUNT_KEY = "documents"

    def _features(self):
        return _text_features()

    def _read(self, path, stats):
        cfg = self.builder_config
        for text in iter_text_documents(path, text_field=cfg.text_field, blank_line_docs=cfg.blank_line_docs,
                                        stats=stats):
            yield {"text": text}


class SummarizationPairs(_LocalFilesBuilder):
    """Document -> summary pairs from local JSON lines / TSV files. Features: {'document', 'summary'}."""

    COUNT_KEY = "pairs"

    def _features(self):
        return _pair_features()

    def _read(self, path, stats):
        cfg = self.builder_config
        return iter_pairs(path, document_field=cfg.document_field, summary_field=cfg.summary_field, stats=stats)


class StdlibDocs(_Builder):
    """The built-in corpus: config 'documents' ({'text'}) or 'pairs' ({'document', 'summary'})."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="documents", description="stdlib documentation, one doc per module"),
        tfds.core.BuilderConfig(name="pairs", description="docstring body -> its one-line summary"),
    ]

    def _features(self):
        return _text_features() if self.builder_config.name == "documents" else _pair_features()

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        from bart_jax.data.builtin import harvest_stdlib_docs

        corpus = harvest_stdlib_docs()
        if self.builder_config.name == "documents":
            for i, text in enumerate(corpus.documents[split]):
                yield i, {"text": text}
            self._record_stats(split, {"documents": len(corpus.documents[split])})
        else:
            for i, pair in enumerate(corpus.pairs[split]):
                yield i, pair
            self._record_stats(split, {"pairs": len(corpus.pairs[split])})


class PreparedDataset(collections.abc.Mapping):
    """A prepared dataset: split -> random-access data source (tfds ArrayRecordDataSource), plus
    `path` (the dataset's version directory), `stats` (split -> input statistics), `fingerprint` (of the
    inputs and options it was built from: a rebuild from other files changes it) and `kind`."""

    def __init__(self, path: str, sources: dict, stats: dict, fingerprint: str | None = None,
                 kind: str | None = None):
        self.path, self._sources, self.stats, self.fingerprint = path, dict(sources), stats, fingerprint
        self.kind = kind  # 'text' (a corpus: {'text'}) or 'pairs' ({'document', 'summary'})

    def __getitem__(self, split):
        if split not in self._sources:
            raise KeyError(f"split {split!r} not in dataset at {self.path} (has {sorted(self._sources)})")
        return self._sources[split]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self):
        return len(self._sources)

    def __repr__(self):
        sizes = {split: len(src) for split, src in self._sources.items()}
        return f"PreparedDataset({self.path!r}, sizes={sizes})"


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Opens a prepared dataset from its version directory (`PreparedDataset.path`); needs no builder code."""
    builder = tfds.builder_from_directory(os.fspath(path))
    metadata = dict(builder.info.metadata or {})
    kind = "pairs" if "summary" in builder.info.features else "text"
    return PreparedDataset(os.fspath(path), builder.as_data_source(), metadata.get("stats", {}),
                           metadata.get("fingerprint"), kind)


def _prepare(builder_cls, config, data_dir, fingerprint: str, overwrite: bool) -> PreparedDataset:
    """Builds (or reuses, when the inputs' fingerprint matches) a dataset in data_dir and opens it.

    A lock file in data_dir serializes builders of the same dataset: a second process waits, then reuses.
    """
    from bart_jax.runlock import file_lock

    name = config if isinstance(config, str) else config.name
    with file_lock(os.path.join(os.fspath(data_dir), f".{builder_cls.name}-{name}.lock")):
        return _prepare_unlocked(builder_cls, config, data_dir, fingerprint, overwrite)


def _prepare_unlocked(builder_cls, config, data_dir, fingerprint: str, overwrite: bool) -> PreparedDataset:
    builder = builder_cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    path = os.fspath(builder.data_path)
    meta_path = os.path.join(path, "metadata.json")
    if os.path.exists(meta_path) and not overwrite:
        with open(meta_path) as f:
            if json.load(f).get("fingerprint") != fingerprint:
                raise ValueError(f"{path} holds a dataset built from other inputs or options; pass "
                                 f"--overwrite or use another --name")
    builder.info.metadata["fingerprint"] = fingerprint
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    _quiet_build(builder, tfds.download.DownloadConfig(download_mode=mode))
    return load_prepared(path)


def _quiet_build(builder, download_config) -> None:
    """download_and_prepare without TFDS's progress bars and its stdout banners (temporary directory names):
    one log line instead; the caller shows its own progress."""
    logging.getLogger(__name__).info("building dataset %s", builder.data_path)
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=download_config)


def _check_split_paths(split_paths: dict) -> dict:
    out = {}
    for split, paths in split_paths.items():
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            continue
        missing = [os.fspath(p) for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"split {split!r}: no such file(s) {missing}")
        out[split] = [os.path.abspath(p) for p in paths]
    if not out:
        raise ValueError("no input files given")
    return out


def _holdout_part(holdout_every: int) -> tuple:
    # Absent when 0, so datasets built before the option existed keep their fingerprint.
    return (("holdout_every", holdout_every),) if holdout_every else ()


def _check_holdout(split_paths: dict, holdout_every: int) -> int:
    if holdout_every < 0:
        raise ValueError(f"holdout_every must be >= 0, got {holdout_every}")
    if holdout_every and "validation" in split_paths:
        raise ValueError("validation files given and a validation split held out of train: choose one")
    if holdout_every and "train" not in split_paths:
        raise ValueError("a validation split held out of train needs train files")
    return holdout_every


def prepare_text_corpus(split_paths: dict, data_dir: str | os.PathLike, *, name: str = "default",
                        text_field: str = "text", blank_line_docs: bool = False, holdout_every: int = 0,
                        overwrite: bool = False) -> PreparedDataset:
    """Builds the `text_corpus` dataset `name` in data_dir from {split: [files]}; returns its sources.

    Each source element is {'text': bytes}. `holdout_every` = n > 0 (only without validation files):
    every n-th training document becomes the validation split. Reuses an existing build of the same inputs.
    """
    split_paths = _check_split_paths(split_paths)
    holdout_every = _check_holdout(split_paths, holdout_every)
    config = TextCorpusConfig(name=name, split_paths=split_paths, text_field=text_field,
                              blank_line_docs=blank_line_docs, holdout_every=holdout_every)
    fingerprint = _fingerprint(_files_fingerprint(split_paths), text_field, blank_line_docs,
                               *_holdout_part(holdout_every))
    return _prepare(TextCorpus, config, data_dir, fingerprint, overwrite)


def prepare_pairs(split_paths: dict, data_dir: str | os.PathLike, *, name: str = "default",
                  document_field: str = "document", summary_field: str = "summary", holdout_every: int = 0,
                  overwrite: bool = False) -> PreparedDataset:
    """Builds the `summarization_pairs` dataset `name` in data_dir from {split: [files]}.

    Each source element is {'document': bytes, 'summary': bytes}. `holdout_every` as in
    `prepare_text_corpus`. Reuses an existing build of the same inputs.
    """
    split_paths = _check_split_paths(split_paths)
    holdout_every = _check_holdout(split_paths, holdout_every)
    config = PairsConfig(name=name, split_paths=split_paths, document_field=document_field,
                         summary_field=summary_field, holdout_every=holdout_every)
    fingerprint = _fingerprint(_files_fingerprint(split_paths), document_field, summary_field,
                               *_holdout_part(holdout_every))
    return _prepare(SummarizationPairs, config, data_dir, fingerprint, overwrite)


def prepare_builtin(data_dir: str | os.PathLike, kind: str = "documents", *,
                    overwrite: bool = False) -> PreparedDataset:
    """Builds the built-in stdlib-docs dataset in data_dir: kind 'documents' (pretraining, {'text'}) or
    'pairs' (summarization, {'document', 'summary'}); splits train/validation/test."""
    if kind not in ("documents", "pairs"):
        raise ValueError(f"kind must be 'documents' or 'pairs', got {kind!r}")
    # The corpus is a function of the interpreter's stdlib: rebuild when the Python version changes.
    return _prepare(StdlibDocs, kind, data_dir, _fingerprint(sys.version, kind), overwrite)
