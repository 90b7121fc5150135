"""One writer per run folder: an advisory lock on `RUN_DIR/.lock`, held for the run's life.

Two runs writing one `--out` would interleave checkpoints, `config.json` and TensorBoard events,
so a `tnt.run.Run` takes an exclusive `fcntl.flock` on `RUN_DIR/.lock` before it writes
anything there, and a second run is refused with the holder's pid, host and start time (which
the holder writes into the file once its inputs are validated). The OS drops the lock when the
holder exits or is killed, so a stale `.lock` file never blocks anyone; the file only records
the last holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from tnt.config import ConfigError

LOCK_FILE = ".lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock (the message names it)."""


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` or raises RunFolderBusy; the folder must
    exist."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._created = self._recorded = False

    def acquire(self) -> None:
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise ConfigError(f"cannot write the run folder --out {self.path.parent}: "
                              f"{e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunFolderBusy(f"{self.path.parent} is in use by another run ({holder}); wait for "
                                f"it to finish or choose another --out") from None
        self._fd = fd

    def record(self) -> None:
        """Write this process into the lock file, for the message a second run gets. Separate
        from `acquire` so that a run refused for bad input leaves the folder byte for byte."""
        self._recorded = True
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock; a lock file this process created for a run it then refused goes too,
        so that a refused command leaves the folder as it found it."""
        if self._fd is not None:
            if self._created and not self._recorded:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        if not self.held:
            self.acquire()
            self.record()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
