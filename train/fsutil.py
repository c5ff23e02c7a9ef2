"""Writes that a crash or a power loss cannot leave half done.

Every file the trainer owns (results, checkpoints, state seals, the image cache, the sweep's files)
is written through ``atomic_file``: a temporary name in the same directory, flushed and fsynced,
renamed over the target, then the directory fsynced so the rename itself is durable. A reader sees
the old file or the whole new one, never a part, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from train.errors import UserError


def fsync_dir(directory: str | Path) -> None:
    """Make the names in ``directory`` (a rename, a new file) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    The body writes the temporary file by any means (``open``, ``safetensors.save_file``, a numpy
    memory map); the file is then fsynced and renamed. On any exception the temporary file is
    removed and ``path`` is untouched. ``sync_dir=False`` leaves the directory fsync to the caller
    (the best checkpoint does it off the training path).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class RunLock:
    """An exclusive lock on a run directory, held for the whole run by its main process.

    ``fcntl.flock`` on ``<run_dir>/.lock``: advisory, and released by the kernel when the process
    dies, so a kill -9 never leaves a run locked. The file is created empty and never written, so
    taking the lock changes no file of an existing run; the holder a refusal names comes from the
    kernel's lock table (``/proc/locks``, Linux).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``UserError`` (held by another process, or not writable)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in the run directory '{self.path.parent}' ({e.strerror}); "
                            "a run needs a writable directory: copy it to a writable disk and resume there") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(fd)
            os.close(fd)
            raise UserError(f"run directory '{self.path.parent}' is in use by {holder}; wait for it to end "
                            "(or stop it), or choose another experiment.name") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _flock_holder(fd: int) -> str:
    """``pid N on <host>`` of the process holding a flock on ``fd``'s file, from ``/proc/locks``."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 41233 fd:01:1234567 0 EOF"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    return f"pid {parts[4]} on {socket.gethostname()}"
    except OSError:
        pass
    return "another process (not on this machine, or not visible from here)"
