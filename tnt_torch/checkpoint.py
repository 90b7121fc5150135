"""Checkpoints of a torch run without pickle: safetensors for arrays, JSON for everything else.

Layout: `RUN_DIR/checkpoints/<step>/{params.safetensors, optimizer.safetensors, meta.json}`.
`params.safetensors` holds the canonical float32 `[in, out]` parameters (docs/design.md), so the file
reads the same as a JAX export; `optimizer.safetensors` holds Adam's `exp_avg`, `exp_avg_sq` and
`step` per canonical name. A step is written into a hidden temporary folder and renamed into
place with `os.replace`, so a crash never leaves a half-written step that looks complete; only
the last `keep` steps are kept, pruned through `tnt.checkpoint_io.prune` (renamed aside before
they are deleted). The metadata is `tnt.checkpoint_meta`'s, shared with JAX; locating and
reading checkpoints is `tnt.checkpoint_io`'s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tnt import checkpoint_io
from tnt.backend import Loaded
from tnt.checkpoint_io import read_for_model
from tnt.checkpoint_meta import CheckpointError, CheckpointWriteError, custom_loop_meta, kill_point, reason
from tnt.config import ModelConfig

PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, step: int, params: dict[str, np.ndarray],
         optimizer: dict[str, np.ndarray], meta: dict, keep: int | None = None) -> Path:
    """Write step `step` atomically under `directory` and keep only the last `keep` steps. A
    write that fails (a full disk) is a CheckpointWriteError, its temp folder removed."""
    directory = Path(directory).absolute()
    final = directory / str(int(step))
    tmp = directory / f".tmp-{int(step)}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: np.asarray(v, np.float32, order="C") for k, v in params.items()},
                  str(tmp / PARAMS_FILE), metadata={"format": "tnt-canonical-params"})
        save_file({k: np.asarray(v, np.float32, order="C") for k, v in optimizer.items()},
                  str(tmp / OPTIMIZER_FILE), metadata={"format": "tnt-adam-state"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        for name in (PARAMS_FILE, OPTIMIZER_FILE, META_FILE):
            _fsync(tmp / name)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint step {int(step)} in {directory}: "
                                   f"{reason(e)}; the steps committed before it are intact") from e
    kill_point(f"save:{int(step)}")
    if final.exists():  # re-saving a step: move the old one aside, then drop it
        old = directory / f".old-{int(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(directory)
    if keep is not None:
        for old_step, _ in checkpoint_io.committed(directory)[keep:]:  # newest first
            checkpoint_io.prune(old_step)
    return final


def _load(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {file} is corrupt: {e}") from e


def restore(step_dir: str | Path, expected: ModelConfig
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(params, optimizer state, meta) of one committed step folder (`tnt.checkpoint_io` locates
    it) whose model config equals `expected`; differences are listed by field name before any
    tensor is read."""
    step_dir = Path(step_dir).absolute()
    meta = checkpoint_io.read_meta(step_dir, checkpoint_io.TORCH)
    checkpoint_io.check_config(meta, expected, step_dir)
    params, meta = checkpoint_io.read_step(step_dir, checkpoint_io.TORCH)
    optimizer = _load(step_dir / OPTIMIZER_FILE)
    return params, optimizer, meta


def load(path: str | Path, expect: ModelConfig | None = None) -> Loaded:
    """The model (in eval mode) of the newest readable checkpoint under `path` (either backend's
    layout, read through `tnt.checkpoint_io`) with its config, tokenizer and metadata. With
    `expect`, a checkpoint whose model config differs is refused, naming the fields."""
    from tnt_torch.model import TnT, load_canonical

    params, cfg, tokenizer, meta = read_for_model(path, expect)
    return Loaded(load_canonical(TnT(cfg.model), params).eval(), cfg, tokenizer, meta)


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None):
    """(model, run config, tokenizer) from a checkpoint written by either backend's pretrain.

    `path` is a run dir, its `checkpoints` folder or one step folder. With `expect`, a checkpoint
    whose model config differs is refused, naming the fields.
    """
    loaded = load(path, expect)
    return loaded.model, loaded.cfg, loaded.tokenizer


def save_checkpoint(path: str | Path, model, cfg, tokenizer, step: int) -> Path:
    """Save a custom training loop's `model` as step `step` of the run folder `path` (its
    `checkpoints/<step>/`, committed atomically) with `cfg` (the RunConfig or the model's
    ModelConfig) and `tokenizer`. `load_checkpoint`, `experiments.generate` and either framework
    read it; it holds no optimizer state, so pretrain cannot `--resume` from it."""
    from tnt_torch.model import to_canonical

    meta = custom_loop_meta("torch", step, cfg, model.cfg, tokenizer)
    return save(Path(path) / "checkpoints", step, to_canonical(model), {}, meta)
