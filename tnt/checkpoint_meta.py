"""Checkpoint metadata shared by both frameworks: what a checkpoint says about itself.

Every checkpoint carries, as JSON: the format version, the backend that wrote it, the step (which
is also the data position, since batches are a function of (seed, step)), the run config and the
tokenizer spec. Loading compares the stored model config with the expected one field by field so
that a mismatch is reported by name, before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import os
import signal

from tnt.config import ModelConfig, RunConfig, TrainConfig
from tnt.params import param_specs

KILL_ENV, SIGNAL_ENV = "TNT_TEST_KILL", "TNT_TEST_SIGNAL"
FORMAT = "tnt-checkpoint"
# 2: Adam's moments are those of the stored gradients `eigen_lr * g` (docs/design.md, "The scalers");
# 1: moments of `g`, converted on restore by `adam_moment_factors`.
VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, partial, or does not match the run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, an I/O error); the steps committed before
    it are intact and the partial one is a temp folder, so the run resumes once there is room."""


def reason(error: BaseException, limit: int = 300) -> str:
    """The first line of a storage library's error, for a one-line message: tensorstore's and
    orbax's append the whole store spec (dozens of lines) to what went wrong."""
    text = str(error).split("See full TensorStore details")[0].strip()
    text = (text.splitlines() or [type(error).__name__])[0].strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def make_meta(backend: str, step: int, cfg: RunConfig, tokenizer_spec: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "backend": backend, "step": int(step),
            "config": cfg.to_dict(), "tokenizer": tokenizer_spec,
            "data": {"source": cfg.train.data, "position": int(step), "seed": cfg.train.seed}}


def check_meta(meta: object, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a TnT checkpoint (no '{FORMAT}' metadata)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{where} has checkpoint version {meta.get('version')}, "
                              f"this TnT reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("step", "config", "tokenizer"):
        if key not in meta:
            raise CheckpointError(f"{where} metadata lacks '{key}'")
    return meta


def adam_moment_factors(meta: dict, cfg: ModelConfig) -> dict[str, float]:
    """Per parameter, the factor that turns a checkpoint's first Adam moment into the current
    version's (the second moment takes its square); parameters not listed keep theirs.

    A version-1 checkpoint holds the moments of the effective scalers' gradients `g`; version 2
    those of the stored gradients `m g` (`m` = eigen_lr), so `mu -> m mu`, `nu -> m^2 nu`, exactly.
    """
    if meta["version"] == VERSION:
        return {}
    return {n: s.eigen_lr for n, s in param_specs(cfg).items() if s.eigen_lr != 1.0}


def config_differences(a: object, b: object) -> list[str]:
    """`field: a != b` for every field of two dataclasses (or their dicts) that differs."""
    da = dataclasses.asdict(a) if dataclasses.is_dataclass(a) else dict(a)
    db = dataclasses.asdict(b) if dataclasses.is_dataclass(b) else dict(b)
    return [f"{k}: {da.get(k)!r} != {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if da.get(k) != db.get(k)]


def kill_point(point: str) -> None:
    """Test hook, not a feature: with `TNT_TEST_KILL=<point>` in the environment the process
    SIGKILLs itself here, so the kill-recovery tests (tests/test_kill_recovery.py) can stop a
    run at an exact instant: `save:<step>` is inside a save (torch: the step's files are in the
    temp folder, not yet committed; jax: orbax's asynchronous write has begun), `prune:<step>`
    is between renaming an old step aside and deleting it. `TNT_TEST_SIGNAL=SIGTERM` (or SIGINT)
    sends that signal instead, as a user stopping the run there would."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_ENV, "SIGKILL")))


def custom_loop_meta(backend: str, step: int, cfg, model_cfg, tokenizer) -> dict:
    """The metadata of a checkpoint a custom training loop saves (`tnt_jax.save_checkpoint`,
    `tnt_torch.save_checkpoint`): `cfg` is a RunConfig or the model's ModelConfig (then a default
    TrainConfig that fits it); refused when it is not the config `model_cfg` was built with."""
    if isinstance(cfg, ModelConfig):
        length = min(TrainConfig.seq_len, cfg.max_len_decoder, cfg.max_len_encoder)
        cfg = RunConfig(model=cfg, train=TrainConfig(seq_len=length))
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig or ModelConfig, got {type(cfg).__name__}")
    diff = config_differences(cfg.model, model_cfg)
    if diff:
        raise CheckpointError("the model was not built with cfg: " + "; ".join(diff))
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be an integer >= 0, got {step!r}")
    return make_meta(backend, step, cfg, tokenizer.spec)
