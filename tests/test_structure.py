"""How the code is laid out: libraries only raise and log; printing and argument parsing live in bart_jax.cli."""

from __future__ import annotations

import ast
import os

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
