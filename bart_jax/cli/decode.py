"""`bart-jax generate` (stream documents through beam search) and `bart-jax evaluate` (ROUGE on a split)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Sequence

from bart_jax.decode.files import (
    count_documents,
    load_model_for_inference,
    read_documents,
    read_pairs,
    write_predictions,
)
from bart_jax.decode.generate import (
    CONTROL_NAMES,
    GENERATION_CONTROLS,
    generate_texts,
    load_generation_preset,
    resolve_controls,
)
from bart_jax.errors import UserError, check_input_file, check_writable_dir


# ----------------------------------------------------------------------------- argument parsing
def _option_type(name: str, parse):
    """An argparse type from a registry parser: a bad value is a usage error naming the option."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} ({e})") from None

    convert.__name__ = name
    return convert


_SENTINEL = object()  # "not given": None is a meaningful value for the forced token ids


def _add_model_and_control_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="Hugging Face / fairseq / bart_jax checkpoint (directory or model.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint directory)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype override")
    parser.add_argument("--preset", default="default",
                        help="generation preset: a bundled name (default, cnn_dm, xsum) or a YAML path")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-source-length", type=int, default=None,
                        help="truncate documents to this many tokens (default: max_position_embeddings)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    group = parser.add_argument_group("generation controls (override the preset; Hugging Face meanings)")
    for name, control in GENERATION_CONTROLS.items():
        option = "--" + name.replace("_", "-")
        if control.flag:
            group.add_argument(option, action="store_true", default=_SENTINEL, help=control.help)
        else:
            group.add_argument(option, type=_option_type(name, control.parse), default=_SENTINEL,
                               help=control.help)


def _controls_from_args(args, config) -> dict:
    controls = load_generation_preset(args.preset)
    controls.update({n: getattr(args, n) for n in CONTROL_NAMES if getattr(args, n) is not _SENTINEL})
    resolve_controls(config, **controls)  # fail before any compute on a bad combination
    return controls


def _setup(args):
    """(config, params, tokenizer, controls) from the model and control options, checked before any compute."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}: must be >= 1")
    if args.max_source_length is not None and args.max_source_length < 1:
        raise ValueError(f"--max-source-length={args.max_source_length}: must be >= 1 (or left out for the "
                         "model's max_position_embeddings)")
    overrides = {"dtype": args.dtype} if args.dtype else {}
    config, params, tokenizer = load_model_for_inference(args.checkpoint, args.tokenizer, **overrides)
    return config, params, tokenizer, _controls_from_args(args, config)


def _texts(documents, config, params, tokenizer, controls: dict, args):
    """`generate_texts` with the batch, source-length and seed options."""
    import jax

    return generate_texts(documents, config, params, tokenizer, batch_size=args.batch_size,
                          max_source_length=args.max_source_length, rng=jax.random.PRNGKey(args.seed), **controls)


# ----------------------------------------------------------------------------- generate
def _check_output_file(path: str) -> None:
    """Fail before any work when `path` ('-' = stdout) cannot be written."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise UserError(f"--output {path}: is a directory; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"--output {path}: not writable")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), "--output")


def cli_generate(argv: Sequence[str]) -> int:
    """`bart-jax generate --checkpoint DIR [--input FILE|-] [--output FILE|-] [--preset cnn_dm] [controls]`."""
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog="bart-jax generate", description=(
        "Summarize / generate from documents (one per line, or JSON lines with --text-field), streamed in "
        "fixed-shape batches. Output: one line per returned sequence, or JSON lines when --output ends in .jsonl."))
    _add_model_and_control_args(parser)
    parser.add_argument("--input", default="-", help="input file, '-' = stdin (default)")
    parser.add_argument("--output", default="-", help="output file, '-' = stdout (default)")
    parser.add_argument("--text-field", default="document", help="JSON field of .jsonl input documents")
    args = parser.parse_args(list(argv))
    # User errors propagate to the `bart-jax` dispatcher (one line, exit code 2).
    if args.input != "-":
        check_input_file(args.input, "--input")
    _check_output_file(args.output)
    config, params, tokenizer, controls = _setup(args)
    total = count_documents(args.input)
    jsonl = args.output.endswith(".jsonl")
    start, count = time.perf_counter(), 0
    with contextlib.ExitStack() as stack:
        out = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        results = _texts(read_documents(args.input, args.text_field), config, params, tokenizer, controls, args)
        for texts, scores in tqdm(results, total=total, unit="doc", file=sys.stderr, desc="generate", disable=None):
            if jsonl:
                out.write(json.dumps({"index": count, "summaries": texts, "scores": scores}) + "\n")
            else:
                out.writelines(" ".join(t.split()) + "\n" for t in texts)
            out.flush()
            count += 1
    seconds = time.perf_counter() - start
    print(f"generated {count} documents in {seconds:.1f}s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- evaluate
def cli_evaluate(argv: Sequence[str]) -> int:
    """`bart-jax evaluate --checkpoint DIR --data DATASET_DIR|FILE [--split validation] [--output-dir DIR]`."""
    from tqdm import tqdm

    from bart_jax.decode.rouge import rouge_scores

    parser = argparse.ArgumentParser(prog="bart-jax evaluate", description=(
        "ROUGE-1/2/L/Lsum (rouge-score, stemmed; Lsum over sentence-split text) of a checkpoint's summaries "
        "on a summarization_pairs split; writes predictions.<split>.jsonl and rouge.<split>.json."))
    _add_model_and_control_args(parser)
    parser.add_argument("--data", required=True, help="prepared summarization_pairs dataset directory or pairs file")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    parser.add_argument("--output-dir", default=".", help="where predictions and metrics are written")
    args = parser.parse_args(list(argv))
    # User errors propagate to the `bart-jax` dispatcher (one line, exit code 2).
    if os.path.lexists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a directory")
    check_writable_dir(args.output_dir, "--output-dir")
    config, params, tokenizer, controls = _setup(args)
    pairs = read_pairs(args.data, args.split, args.limit)
    if not pairs:
        raise ValueError(f"--data {args.data} split {args.split!r} has no pairs")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    results = _texts((p["document"] for p in pairs), config, params, tokenizer, controls, args)
    best = (texts[0] for texts, _ in tqdm(results, total=len(pairs), unit="doc", file=sys.stderr, desc="evaluate",
                                                disable=None))
    predictions = write_predictions(os.path.join(args.output_dir, f"predictions.{args.split}.jsonl"), pairs, best)
    seconds = time.perf_counter() - start
    metrics = rouge_scores(predictions, [p["summary"] for p in pairs])
    report = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "examples": len(pairs),
              "controls": controls, "seconds": round(seconds, 2), **{k: round(v, 4) for k, v in metrics.items()}}
    with open(os.path.join(args.output_dir, f"rouge.{args.split}.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0
