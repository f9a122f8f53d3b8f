"""`bart-jax` command line: the dispatcher, with one module per command group (`data`, `convert`, `decode`,
`run`, `train`). The one place where user errors become one line and exit
code 2, and where logging is configured; the libraries themselves only raise and log."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading

# subcommand -> (module, function, one-line help). Modules are imported lazily so `bart-jax --help`
# is instant and a subcommand only pays for what it uses.
COMMANDS = {
    "convert": ("bart_jax.cli.convert", "cli_convert",
                "convert Hugging Face / fairseq checkpoints to and from bart_jax"),
    "tokenizer": ("bart_jax.cli.data", "cli_tokenizer", "train or inspect a SentencePiece tokenizer"),
    "data": ("bart_jax.cli.data", "cli_data", "build TFDS datasets (text corpus, summarization pairs, built-in)"),
    "pretrain": ("bart_jax.cli.train", "cli_pretrain", "denoising pretraining"),
    "finetune": ("bart_jax.cli.train", "cli_finetune", "fine-tuning on document -> summary pairs"),
    "generate": ("bart_jax.cli.decode", "cli_generate", "beam search / greedy / sampling from a checkpoint"),
    "evaluate": ("bart_jax.cli.decode", "cli_evaluate", "ROUGE of a checkpoint on a summarization split"),
    "run": ("bart_jax.cli.run", "cli_run", "the main job: tokenizer -> pretrain -> fine-tune -> beam search -> ROUGE"),
}


def _usage() -> str:
    lines = ["usage: bart-jax [--version] [--debug] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, _, doc) in COMMANDS.items()]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"bart-jax {of('bart_jax')} (jax {of('jax')}, flax {of('flax')}, optax {of('optax')})"


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (multi-line problem lists are joined with '; ')."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def _raise_terminated(signum, frame):
    from bart_jax.errors import Terminated

    raise Terminated()


def _configure_logging(debug: bool) -> None:
    """Libraries log through `logging`; the command line shows warnings (and bart_jax's debug messages with
    --debug). absl's logger carries orbax's and TFDS's routine notices (e.g. a read-only restore), kept for
    --debug."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:  # bart_jax's own messages only: JAX's and XLA's debug logging would bury them
        logging.getLogger("bart_jax").setLevel(logging.DEBUG)
    else:
        logging.getLogger("absl").setLevel(logging.ERROR)


# Commands that compile XLA programs: they keep them in a persistent cache, so a rerun, a resumed stage and the
# main job's second fine-tune (the same programs as the first) skip compilation.
_COMPILING = {"pretrain", "finetune", "run", "generate", "evaluate"}


def _use_compilation_cache() -> None:
    """JAX's persistent compilation cache in $XDG_CACHE_HOME/bart_jax/xla (default ~/.cache/bart_jax/xla);
    JAX_COMPILATION_CACHE_DIR, when set, chooses the directory instead (JAX reads it itself). An unwritable
    location means no cache, not an error."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "bart_jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        logging.getLogger(__name__).info("no persistent compilation cache (%s)", e)
        return
    if not os.access(path, os.W_OK):
        logging.getLogger(__name__).info("no persistent compilation cache (%s is not writable)", path)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand. The one place where user errors become `bart-jax <command>: error: ...`
    plus exit code 2, and interruptions exit 130 (SIGINT) / 143 (SIGTERM), without a traceback; `--debug`
    (anywhere) or BART_JAX_DEBUG=1 re-raises instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BART_JAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bart-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from bart_jax.errors import Interrupted, Terminated

    _configure_logging(debug)
    if name in _COMPILING:
        _use_compilation_cache()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if name in ("generate", "evaluate"):  # (training commands check in preflight, after any distributed start)
            from bart_jax.errors import check_platform

            check_platform()
        fn = getattr(importlib.import_module(module), func)
        return int(fn(rest) or 0)
    except Interrupted as e:
        if debug:
            raise
        print(f"bart-jax {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"bart-jax {name}: interrupted", file=sys.stderr)
        return 128 + int(signum)
    except (ValueError, OSError) as e:  # user errors (UserError is a ValueError)
        if debug:
            raise
        print(f"bart-jax {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
