"""`bart-jax convert`: a Hugging Face, fairseq or bart_jax checkpoint to a bart_jax or Hugging Face directory,
with the tokenizer files it carries."""

from __future__ import annotations

import argparse
import os
import shutil

from bart_jax.convert import from_pretrained, save_model, save_pretrained
from bart_jax.convert.checkpoints import TOKENIZER_FILES, is_model_dir
from bart_jax.errors import UserError, check_writable_dir
from bart_jax.model import param_count


def _tokenizer_files(source: str) -> list[str]:
    if not os.path.isdir(source):
        return []
    return [os.path.join(source, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]


def _check_output_dir(source: str, output: str, overwrite: bool) -> None:
    """Refuse to write where something of the user's would be lost (checked before any loading)."""
    src = os.path.realpath(source)
    out = os.path.realpath(output)
    if out == src or (os.path.isfile(src) and out == os.path.dirname(src)):
        raise UserError(f"output {output} is the source checkpoint; write to another directory")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UserError(f"output {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output):
        if not is_model_dir(out):
            raise UserError(f"output {output} is not empty and is not a model directory (it holds files a model "
                            "directory does not); refusing to replace it (choose a new or empty directory)")
        if not overwrite:
            raise UserError(f"output {output} already holds a model; pass --overwrite to replace it")
    check_writable_dir(os.path.dirname(os.path.abspath(output)), "output")


def cli_convert(argv) -> int:
    """`bart-jax convert SOURCE OUTPUT [--to bart_jax|hf] [--overwrite]`."""
    parser = argparse.ArgumentParser(
        prog="bart-jax convert",
        description="Convert BART checkpoints. Reads Hugging Face dirs, fairseq .pt and bart_jax dirs.")
    parser.add_argument("source", help="checkpoint to read (HF directory, fairseq model.pt, or bart_jax directory)")
    parser.add_argument("output", help="directory to write")
    parser.add_argument("--to", choices=("bart_jax", "hf"), default="bart_jax",
                        help="output format (default: bart_jax)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it already holds a model (never any other directory)")
    args = parser.parse_args(argv)
    _check_output_dir(args.source, args.output, args.overwrite)
    config, params = from_pretrained(args.source)
    tokenizer_files = _tokenizer_files(args.source)

    def copy_tokenizer(tmp):
        for path in tokenizer_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))

    (save_model if args.to == "bart_jax" else save_pretrained)(args.output, config, params, extra=copy_tokenizer)
    print(f"wrote {args.to} checkpoint to {args.output} ({param_count(params):,} parameters, "
          f"vocab {config.vocab_size}, d_model {config.d_model}, "
          f"{config.encoder_layers}+{config.decoder_layers} layers)")
    return 0
