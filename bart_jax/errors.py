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


def check_input_file(path: str | os.PathLike, what: str) -> None:
    """Raise UserError unless `path` is a readable file (a directory or a missing path says which)."""
    if os.path.isdir(path):
        raise UserError(f"{what} {os.fspath(path)}: is a directory; give a file (or the files in it)")
    if not os.path.isfile(path):
        raise UserError(f"{what} {os.fspath(path)}: no such file")


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


def check_platform() -> None:
    """Raise UserError when JAX cannot start the platforms JAX_PLATFORMS names (e.g. 'cuda' on a machine
    without a GPU or without jax's CUDA plugin), before anything else asks JAX for a device."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError, ValueError) as e:
        wanted = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"JAX_PLATFORMS={wanted!r}: JAX cannot start it on this machine"
                        + (f" ({detail})" if detail else "")
                        + "; unset JAX_PLATFORMS or name a platform this machine has (e.g. cpu)") from None
