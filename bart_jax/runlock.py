"""Advisory locks: one process per run directory, one builder per dataset.

`run_directory_lock(workdir)` holds `<workdir>/.lock` (fcntl.flock, released by the kernel when the
holder dies) for a whole run and records the holder's pid and start time in it, so a second process
fails at once naming the first. The lock is re-entrant within a process (the main job holds it while its
stages take it again). `file_lock(path)` is a plain blocking lock, e.g. around a dataset build.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import threading

from bart_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth]
_held_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> tuple[int | None, str]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").split()
    pid = int(text[0]) if text and text[0].isdigit() else None
    return pid, " ".join(text[1:2])


@contextlib.contextmanager
def run_directory_lock(workdir: str | os.PathLike):
    """Hold `<workdir>/.lock` (creating workdir) for the duration; UserError if another process holds it."""
    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.realpath(os.path.join(workdir, LOCK_NAME))
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, since = _read_holder(fd)
                os.close(fd)
                who = f"pid {pid}" + (f" (started {since})" if since else "") if pid else "another process"
                raise UserError(f"run directory {workdir} is in use by {who}; wait for it to finish, stop it, "
                                "or use another workdir") from None
            except BaseException:
                os.close(fd)
                raise
            pid, since = _read_holder(fd)
            if pid is not None and pid != os.getpid():
                alive = "still running but no longer holding it" if _pid_alive(pid) else "no longer running"
                log.warning("run directory %s: taking over the lock left by pid %d (started %s), %s",
                            workdir, pid, since or "?", alive)
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {started}\n".encode(), 0)
            _held[path] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                os.ftruncate(entry[0], 0)  # a clean exit leaves no holder behind
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive blocking lock on `path` (created) for the duration."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
