"""Ctrl-C and SIGTERM stop a run cleanly: the signal raises `Stopped` in the main thread, the run
lets a save in flight commit and closes its files on the way out, and the command line says in one
line which step to resume from (exit code 128 + the signal's number, as a shell reports it).
A second signal while the run is stopping exits at once; the checkpoints stay as they were
committed (a save in flight is a temp folder, removed by the next start).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tnt import checkpoint_io

NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt is, so that no library's
    `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(NAMES.get(signum, signal.Signals(signum).name))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self, run_dir: str | Path | None) -> str:
        """Where the run in `run_dir` stands: the step `--resume` continues from, or none."""
        ckpt_dir = Path(run_dir) / "checkpoints" if run_dir is not None else None
        found = checkpoint_io.committed(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else []
        if not found:
            return f"stopped by {self}, before the first checkpoint: nothing to resume, start it again"
        return (f"stopped by {self}; the last checkpoint is step {found[0][0].name} in {ckpt_dir}: "
                f"continue with --resume --out {run_dir}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises Stopped and a second exits at once.
    A signal the process was started ignoring (`nohup`, a background job's SIGINT) stays ignored;
    outside the main thread (where Python runs no handler) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def again(signum, frame) -> None:
        print(f"error: {NAMES.get(signum, signum)} again while stopping: exiting now; the committed "
              f"checkpoints are intact (continue with --resume)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def first(signum, frame) -> None:
        for s in previous:
            signal.signal(s, again)
        raise Stopped(signum)

    previous = {}
    for s in NAMES:
        current = signal.getsignal(s)
        if current in (signal.default_int_handler, signal.SIG_DFL):
            previous[s] = current
            signal.signal(s, first)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
