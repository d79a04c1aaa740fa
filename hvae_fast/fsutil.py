"""File-system helpers every layer may use: flock'ed lock files that name their holder.

A lock is an ``fcntl.flock`` on an open file, so the OS releases it when its process dies, however
it dies (kill -9 included); the holder writes its pid into the file for the one that finds it held.
"""

from __future__ import annotations

import fcntl
import os


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
