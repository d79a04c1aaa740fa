"""File-system helpers every layer may use: atomic writes, and flock'ed lock files that name their holder.

``atomic_write`` is the project's one way to replace a file: a new temporary file with a unique name
(``.<name>.tmp-<random>``, created O_EXCL, so never through a planted link) beside the target, fsync,
rename over the target (which replaces a link there, never writes through it), fsync of the folder.
A failed write removes its temporary file and leaves the target as it was.

A lock is an ``fcntl.flock`` on an open file, so the OS releases it when its process dies, however
it dies (kill -9 included); the holder writes its pid into the file for the one that finds it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def temp_prefix(name: str) -> str:
    """The start of the temporary names ``atomic_write`` gives a file called ``name``."""
    return f".{name}.tmp-"


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (other threads may be
    creating files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, check=None) -> None:
    """``write(binary file)`` into a new uniquely named temporary file beside ``path``, fsync, then
    ``check(temporary path)`` if given (it raises to refuse the content), rename over ``path``, fsync
    the folder. On any failure the temporary file is removed, ``path`` is left as it was and the
    exception propagates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; the file gets the mode open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path) -> None:
    """``text`` (UTF-8) to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(text.encode()))


def try_flock(fd: int) -> str | None:
    """Take the exclusive flock of the open lock file ``fd`` without waiting: None, or, when another
    process holds it, the pid that process wrote there ('?' when the file does not say)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode(errors="replace").strip()
        return pid if pid.isdigit() else "?"


def flock_waiting(fd: int, on_wait=None) -> None:
    """Take the exclusive flock of ``fd``, waiting for the process that holds it; ``on_wait(pid)`` is
    called once, before the wait, when there is one (pid as try_flock gives it)."""
    holder = try_flock(fd)
    if holder is None:
        return
    if on_wait is not None:
        on_wait(holder)
    fcntl.flock(fd, fcntl.LOCK_EX)


def write_pid(fd: int) -> None:
    """Make the held lock file ``fd`` name this process, for the one that finds it held."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
