"""One command at a time per run folder: an exclusive, non-blocking ``fcntl`` lock held for the whole command.

The lock file holds the holder's PID, so a second command can say who holds it. The kernel drops the lock when its
holder exits, killed or not, so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from idto3d.core.errors import IdtoError


class RunBusyError(IdtoError):
    """Another command holds the run folder."""


class RunLock:
    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self.folder = folder
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RunBusyError(f"{self.folder} is in use by another idto3d command (PID {holder}); wait for it to "
                               f"finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
