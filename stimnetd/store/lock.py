"""One daemon per state directory: an exclusive flock on `stimnetd.lock` in it.

Two daemons on one store would each think they own its queue, its audit head and its
sandbox containers. The lock is the kernel's: it goes with the process, however it ends
(SIGKILL included), so a stale file never keeps a site down. The holder writes its PID
into the file, so the second instance can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from stimnet.errors import StimnetError

LOCK_NAME = "stimnetd.lock"


class StateDirLocked(StimnetError):
    code = "FAILED_PRECONDITION"


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StateDirLocked naming the holder's PID, at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(
                f"state directory {self.path.parent} is in use by another stimnetd "
                f"(pid {holder}); stop it first, or give this one its own [node] state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock
