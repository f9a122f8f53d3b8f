"""`bart-jax data text|pairs|builtin` (build TFDS datasets) and `bart-jax tokenizer train|encode|decode`.

Library imports stay inside the commands: the tokenizer command never pays for tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import time

from bart_jax.errors import UserError


DEFAULT_HOLDOUT_EVERY = 100  # 1%: training and `run` want a validation split; few corpora come with one


def _data_parser() -> argparse.ArgumentParser:
    from bart_jax.data.datasets import SPLITS

    parser = argparse.ArgumentParser(prog="bart-jax data", description="build TFDS (array_record) datasets")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("text", "pretraining corpus from .txt/.jsonl/.gz files"),
                               ("pairs", "summarization pairs from .jsonl/.tsv files")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("--data-dir", required=True)
        p.add_argument("--name", default="default", help="dataset config name (several can share a data dir)")
        for split in SPLITS:
            p.add_argument(f"--{split}", nargs="*", default=[], metavar="FILE")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--holdout-every", type=int, default=None, metavar="N",
                       help=f"without --validation files: every N-th training example becomes the validation "
                            f"split (default {DEFAULT_HOLDOUT_EVERY}; 0: no validation split)")
        if command == "text":
            p.add_argument("--text-field", default="text", help="JSON field holding the document")
            p.add_argument("--blank-line-docs", action="store_true",
                           help="documents are separated by blank lines (default: one per line)")
        else:
            p.add_argument("--document-field", default="document")
            p.add_argument("--summary-field", default="summary")
    p = sub.add_parser("builtin", help="the built-in corpus harvested from the Python standard library")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--kind", choices=("documents", "pairs", "both"), default="both")
    p.add_argument("--overwrite", action="store_true")
    return parser


def cli_data(argv: list[str]) -> int:
    """`bart-jax data text|pairs|builtin --data-dir DIR ...`: build a dataset, print its sizes and stats."""
    args = _data_parser().parse_args(argv)
    start = time.perf_counter()
    # User errors (bad or empty input) reach the `bart-jax` dispatcher: one line, exit code 2.
    from bart_jax.data.datasets import SPLITS, prepare_builtin, prepare_pairs, prepare_text_corpus
    from bart_jax.errors import check_writable_dir

    check_writable_dir(args.data_dir, "--data-dir")
    if args.command == "builtin":
        kinds = ("documents", "pairs") if args.kind == "both" else (args.kind,)
        prepared = [prepare_builtin(args.data_dir, kind, overwrite=args.overwrite) for kind in kinds]
    else:
        split_paths = {split: getattr(args, split) for split in SPLITS}
        holdout_every = args.holdout_every
        if holdout_every is not None and holdout_every < 0:
            raise UserError(f"--holdout-every={holdout_every}: must be >= 0 (0: no validation split)")
        if holdout_every is None:
            holdout_every = DEFAULT_HOLDOUT_EVERY if args.train and not args.validation else 0
        if args.command == "text":
            prepared = [prepare_text_corpus(split_paths, args.data_dir, name=args.name,
                                            text_field=args.text_field, blank_line_docs=args.blank_line_docs,
                                            holdout_every=holdout_every, overwrite=args.overwrite)]
        else:
            prepared = [prepare_pairs(split_paths, args.data_dir, name=args.name,
                                      document_field=args.document_field, summary_field=args.summary_field,
                                      holdout_every=holdout_every, overwrite=args.overwrite)]
    for ds in prepared:
        print(json.dumps({"path": ds.path, "sizes": {s: len(ds[s]) for s in ds}, "stats": ds.stats}))
    for ds in prepared:  # ready to paste as a run override
        key = "data.finetune_source" if ds.kind == "pairs" else "data.pretrain_source"
        print(f"{key}={shlex.quote(os.path.abspath(ds.path))}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def _tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bart-jax tokenizer", description=(
        "Tokenizers behind one interface: SentencePiece models we train, and GPT-2 byte-level BPE "
        "(HF BART checkpoints)."))
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece BPE tokenizer")
    train.add_argument("--input", nargs="*", default=[],
                       help="corpus files (.txt/.jsonl/.gz); default: the built-in stdlib-docs corpus")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    train.add_argument("--max-training-lines", type=int, default=2_000_000)
    train.add_argument("--seed", type=int, default=0)
    encode = sub.add_parser("encode", help="print token ids and pieces of a text")
    encode.add_argument("--tokenizer", required=True)
    encode.add_argument("text")
    decode = sub.add_parser("decode", help="print the text of token ids")
    decode.add_argument("--tokenizer", required=True)
    decode.add_argument("ids", nargs="+", type=int)
    return parser


def cli_tokenizer(argv: list[str]) -> int:
    """`bart-jax tokenizer train|encode|decode ...`."""
    args = _tokenizer_parser().parse_args(argv)
    from bart_jax.data.tokenizer import SPM_MODEL_FILE, load_tokenizer, train_tokenizer

    if args.command == "train":
        from bart_jax.errors import check_input_file, check_writable_dir

        check_writable_dir(args.out, "--out")  # before the training, not after it
        if args.input:
            texts = [pathlib.Path(p) for p in args.input]  # files, never the path strings as text
            for path in texts:
                check_input_file(path, "--input")
        else:
            from bart_jax.data.builtin import builtin_documents

            texts = builtin_documents()["train"]
        start = time.perf_counter()
        tok = train_tokenizer(texts, args.vocab_size, args.out, max_training_lines=args.max_training_lines,
                              seed=args.seed)
        print(f"trained vocab {tok.vocab_size} (mask id {tok.mask_id}) in {time.perf_counter() - start:.1f}s"
              f" -> {os.path.join(args.out, SPM_MODEL_FILE)}")
    elif args.command == "encode":
        tok = load_tokenizer(args.tokenizer)
        ids = tok.encode(args.text)
        print(" ".join(map(str, ids)))
        print(" ".join(tok.id_to_token(i) for i in ids))
    else:
        tok = load_tokenizer(args.tokenizer)
        bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UserError(f"ids {bad} are outside the tokenizer's vocabulary (0 to {tok.vocab_size - 1})")
        print(tok.decode(args.ids, skip_special_tokens=False))
    return 0
