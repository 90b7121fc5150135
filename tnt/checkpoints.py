"""A checkpoint of either backend as canonical numpy parameters, for the analysis tools.

The reading itself (both layouts, errors) is `tnt.checkpoint_io`'s; this adds the run-dir view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tnt.checkpoint_io import locate, newest_readable, read_step
from tnt.config import RunConfig

__all__ = ["Checkpoint", "locate", "read_checkpoint"]


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    meta: dict
    backend: str
    step_dir: Path

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run_dir(self) -> Path | None:
        """The run directory holding `checkpoints/<step>`, if the checkpoint sits in one."""
        parent = self.step_dir.parent
        return parent.parent if parent.name == "checkpoints" else None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The canonical params and metadata of the latest readable checkpoint under `path`, either
    backend (an unreadable newest one falls back to its predecessor with a warning)."""
    def read(step_dir: Path, kind: str) -> Checkpoint:
        return Checkpoint(*read_step(step_dir, kind), kind, step_dir)

    return newest_readable(path, read)
