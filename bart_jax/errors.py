"""User errors and interruptions, and the checks that catch them before any expensive work.

Libraries raise `UserError` (or ValueError / FileNotFoundError / OSError where they already did) for
anything the user can fix: a bad config, bad or empty input, an unreadable or foreign checkpoint, an
unwritable path. The `bart-jax` dispatcher (bart_jax.cli) turns those into one line
`bart-jax <command>: error: ...` and exit code 2; anything else is an internal bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal


class UserError(ValueError):
    """Something the user can fix; the CLI prints its message on one line and exits with code 2."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM at a step boundary (after saving a checkpoint).

    A KeyboardInterrupt subclass so that `except Exception` blocks do not swallow it.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message, self.signum = message, signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (the CLI's handler raises it so clean-up code still runs)."""

    signum = signal.SIGTERM


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise UserError unless directory `path` exists and is writable, or could be created (its nearest
    existing ancestor is a writable directory). Creates nothing."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path}: {probe} is a file, not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {probe} is not writable (read-only file system or no permission); "
                        "choose another path")
