"""`bart-jax` command line: one subcommand per stage, each implemented next to the code it drives."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Modules are imported lazily so `bart-jax --help`
# is instant and a subcommand only pays for what it uses.
COMMANDS = {
    "convert": ("bart_jax.convert", "cli_main", "convert Hugging Face / fairseq checkpoints to and from bart_jax"),
    "tokenizer": ("bart_jax.data.tokenizer", "cli_main", "train or inspect a SentencePiece tokenizer"),
    "data": ("bart_jax.data.datasets", "cli_main", "build TFDS datasets (text corpus, summarization pairs, built-in)"),
    "pretrain": ("bart_jax.train.loop", "cli_pretrain", "denoising pretraining"),
    "finetune": ("bart_jax.train.loop", "cli_finetune", "fine-tuning on document -> summary pairs"),
    "generate": ("bart_jax.decode.cli", "cli_generate", "beam search / greedy / sampling from a checkpoint"),
    "evaluate": ("bart_jax.decode.cli", "cli_evaluate", "ROUGE of a checkpoint on a summarization split"),
    "run": ("bart_jax.pipeline", "cli_main", "the main job: tokenizer -> pretrain -> fine-tune -> beam search -> ROUGE"),
}


def _usage() -> str:
    lines = ["usage: bart-jax <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bart-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(module), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
