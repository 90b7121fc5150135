"""TensorBoard event files written in the calling thread, so that `flush()` means on disk.

tensorboardX's `SummaryWriter` hands every event to a writer thread through a queue, and its
`flush()` syncs the file without draining that queue: scalars logged just before a checkpoint
could be lost by a kill after the checkpoint committed. `EventWriter` keeps tensorboardX's file
format and naming (`events.out.tfevents.<second>.<host><suffix>`) and its purge-step marker, and
writes each event as it is added; `flush()` syncs the file (tensorboardX's record writer fsyncs).
tensorboardX is imported when a writer is made: importing it imports torch, which `tnt` must not.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def default_buckets() -> list[float]:
    """TensorBoard's histogram bucket limits: 0 and +-1e-12 growing by 10% up to 1e20."""
    edges = 1e-12 * 1.1 ** np.arange(int(np.ceil(np.log(1e32) / np.log(1.1))))
    edges = edges[edges < 1e20]
    return [*(-edges[::-1]).tolist(), 0.0, *edges.tolist()]


class EventWriter:
    """`add_scalar`, `add_histogram`, `flush`, `close`: the part of tensorboardX's SummaryWriter
    a training run uses. With `purge_step`, TensorBoard drops the events earlier files logged at
    or after that step (a resumed run supersedes what its killed predecessor logged)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None,
                 filename_suffix: str = "") -> None:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._file = EventsWriter(str(Path(logdir) / "events"), filename_suffix)
        self._event, self._summary, self._buckets = Event, summary, default_buckets()
        if purge_step is not None:
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event) -> None:
        event.wall_time = time.time()
        self._file.write_event(event)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(self._event(step=int(step), summary=self._summary.scalar(tag, float(value))))

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self._write(self._event(step=int(step), summary=self._summary.histogram(
            tag, np.asarray(values), self._buckets)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
