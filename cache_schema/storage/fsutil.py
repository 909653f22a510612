"""Durable file operations: a commit is only a commit once it survives a power cut.

Also an advisory file lock. Files are created with the permissions the umask gives (a teammate
in the same group can read a cache), not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cache_schema.errors import CacheError


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it to read it back
    races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """What open() would give a new file now: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below root (bottom-up), so a rename of root publishes durable data."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path so that readers see either the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 files; the group should read caches and runs
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An advisory lock (flock) on ``lock_path``, created if absent. A dead holder's lock is released by the OS."""
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(what: Path, e: OSError, after: str) -> CacheError:
    """A one-line error for a failed write: full disk, permissions, anything else."""
    if disk_full(e):
        return CacheError(f"{what}: no space left on the device (or quota exceeded); free space and {after}")
    return CacheError(f"{what}: cannot write ({e.strerror or e}); fix the cause and {after}")
