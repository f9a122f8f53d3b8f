"""How the code is laid out: libraries only raise and log; printing and argument parsing live in bart_jax.cli."""

from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bart_jax")
PENDING: set[str] = set()  # library modules still allowed to print (none)


def _library_modules():
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, PACKAGE)
            if name.endswith(".py") and not rel.startswith("cli" + os.sep) and rel not in PENDING:
                yield rel, path


def test_libraries_neither_print_nor_parse_arguments():
    offenders = []
    for rel, path in _library_modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}: print")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if "argparse" in names:
                    offenders.append(f"{rel}:{node.lineno}: argparse")
    assert offenders == [], "library modules print or parse arguments (move it to bart_jax/cli):\n" + "\n".join(
        offenders)


REPO = os.path.dirname(PACKAGE)
# What a committed file must not say: work-episode numbers (the word "stop" and a number), talk of the sessions
# the work was done in, issue tags of the work's own tracker (a number after "#" in brackets), and absolute
# paths of the machine it was developed on. This file holds the patterns, so it is the one file not read.
LEFTOVERS = re.compile(
    r"\b[Ss]tops?[ -]\d+"
    r"|\b(?:[Tt]his|[Tt]hat|[Tt]he same|[Ee]ach|[Mm]y|[Oo]ur|[Nn]ext|[Pp]revious|[Ee]arlier|[Ll]ater) sessions?\b"
    r"|\(#\d{1,3}\)"
    r"|/(?:work|root)/|/tmp/(?:fresh)|ref(?:venv)")  # (spelled so that a plain grep for them skips this line)
BINARY_SUFFIXES = (".safetensors", ".npz", ".bin", ".pt", ".msgpack", ".model", ".gz", ".png")


def _tracked_text_files():
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for rel in listing.decode().split("\0"):
        path = os.path.join(REPO, rel)
        if rel and not rel.endswith(BINARY_SUFFIXES) and rel != "tests/test_structure.py" and os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            if b"\0" not in data[:8192]:
                yield rel, data.decode("utf-8", errors="replace")


def test_no_work_episode_references_or_development_paths():
    offenders = [f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
                 for rel, text in _tracked_text_files() for m in LEFTOVERS.finditer(text)]
    assert offenders == [], ("the repository speaks of the product only: no work-episode numbers, session talk "
                             "or development-machine paths:\n" + "\n".join(offenders))
