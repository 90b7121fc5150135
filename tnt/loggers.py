"""Where a run's scalars go: `--logger tensorboard,wandb` (default tensorboard). Every chosen
logger receives every `add_scalar` and `add_histogram` through `Loggers`; `flush` before a
checkpoint commits puts what TensorBoard was given on disk, and Weights & Biases, which uploads
in its own process, gets the same calls (offline with `WANDB_MODE=offline`: `wandb sync` uploads
the run folder's `wandb/` later).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tnt.config import ConfigError, RunConfig
from tnt.config import did_you_mean as _did_you_mean

LOGGERS = ("tensorboard", "wandb")


class ScalarLogger(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...
    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def parse_loggers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`"tensorboard,wandb"` (or a sequence of names) -> the names, checked; wandb's package is
    checked too, so that a missing one is refused before anything is written."""
    names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip())
    if not names:
        raise ConfigError(f"--logger names no logger; choose from {', '.join(LOGGERS)}")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"unknown --logger {name!r}{_did_you_mean(name, LOGGERS)}; choose from "
                              f"{', '.join(LOGGERS)}")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--logger wandb needs Weights & Biases, the 'wandb' extra: "
                              "pip install 'tnt[wandb]'") from None
    return tuple(dict.fromkeys(names))


class WandbLogger:
    """A Weights & Biases run in `out/wandb/` (project `tnt`, named after the run folder), its
    config the run's; `WANDB_MODE`, `WANDB_PROJECT` and the other WANDB_* variables apply."""

    def __init__(self, out: Path, cfg: RunConfig, resumed_at: int) -> None:
        import wandb

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self._run = wandb.init(project="tnt", name=out.name, dir=str(out), config=cfg.to_dict(),
                               tags=[f"from-step-{resumed_at}"] if resumed_at else None,
                               reinit="create_new")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._run.log({tag: float(value)}, step=int(step))

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self._run.log({tag: self._wandb.Histogram(np.asarray(values))}, step=int(step))

    def flush(self) -> None:
        """Weights & Biases writes from its own process; nothing to wait for here."""

    def close(self) -> None:
        self._run.finish()


class Loggers:
    """The chosen loggers as one: each call goes to every one of them."""

    def __init__(self, loggers: Sequence[ScalarLogger]) -> None:
        self.loggers = list(loggers)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        for logger in self.loggers:
            logger.add_histogram(tag, values, step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
