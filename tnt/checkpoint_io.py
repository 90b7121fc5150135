"""The one checkpoint reader: locate a step folder, read its metadata, compare configs, and read
the canonical parameters of a checkpoint written by either backend, without either framework.
The frameworks' `checkpoint.py` keep only writing and restoring onto their devices; the
cross-framework loaders (`tnt_jax.load_checkpoint`, `tnt_torch.load_checkpoint`), pretrain's
resume and the analysis tools all stand on this module.

Two layouts exist under `RUN_DIR/checkpoints/<step>/`:
- jax (orbax): `state/` (an OCDBT key-value store of zarr arrays) and `meta/metadata` (JSON);
- torch: `params.safetensors`, `optimizer.safetensors` and `meta.json`.
Both hold the same canonical names, `[in, out]` layout, float32. A Hugging Face folder written by
`experiments.export` (`tnt.hf_export`) reads as the checkpoint it was exported from.

The jax parameters are read here with tensorstore (the library orbax writes with), which needs
no JAX devices but relies on orbax's on-disk layout (`params.<name>` zarr arrays in the store):
pyproject.toml pins the orbax versions checked, and `parity_tests/test_checkpoints.py` reads a
real orbax checkpoint this way, so a layout change fails that test loudly.

Recovery: both writers commit a step by renaming a temporary folder (orbax:
`<step>.orbax-checkpoint-tmp-*`, torch: `.tmp-<step>-<pid>`), so a kill leaves at most a temp
folder, which is never taken for a checkpoint. Old steps are pruned alike: a step folder is first
renamed into `PRUNED` and only then deleted, so a kill while pruning never leaves a step folder
that is neither committed nor temporary. `stale_temp_folders` lists what interrupted saves and
prunes leave (temp folders, `PRUNED`, and numbered folders that are not committed steps). When
the newest committed step of a run cannot be read, `read_canonical` falls back to the one before
it with a `CheckpointFallback` warning naming both.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from tnt import hf_export
from tnt.checkpoint_meta import CheckpointError, check_meta, config_differences, kill_point, reason
from tnt.config import ConfigError, ModelConfig, RunConfig
from tnt.params import check_canonical
from tnt.special_ids import check_special_ids
from tnt.tokenizer import tokenizer_from_spec

JAX, TORCH, HF = "jax", "torch", "hf"
META_FILE = {JAX: "meta/metadata", TORCH: "meta.json"}
TEMP_MARKERS = (".orbax-checkpoint-tmp", ".tmp-", ".old-")  # orbax's and tnt_torch's temp names
PRUNED = ".tmp-pruned"  # old steps are renamed into this folder before they are deleted


class CheckpointFallback(UserWarning):
    """The newest checkpoint of a run is unreadable; an older one was used (message names both)."""


def layout(step_dir: Path) -> str | None:
    """Which backend wrote a step folder, or None if it is not a committed checkpoint."""
    if not step_dir.name.isdigit():
        return None
    if (step_dir / "state").is_dir() and (step_dir / "meta").is_dir():
        return JAX
    if (step_dir / "params.safetensors").is_file() and (step_dir / "meta.json").is_file():
        return TORCH
    return None


def _checkpoints_folder(path: str | Path) -> Path:
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def committed(path: str | Path) -> list[tuple[Path, str]]:
    """Every committed (step folder, backend) under a run dir or checkpoints folder, newest
    first; a step folder gives itself. Temp folders and partial steps are not listed."""
    path = _checkpoints_folder(path)
    if hf_export.is_export(path):
        return [(path, HF)]
    kind = layout(path)
    if kind:
        return [(path, kind)]
    if not path.is_dir():
        return []
    found = sorted(((int(p.name), p) for p in path.iterdir() if layout(p)), reverse=True)
    return [(p, layout(p)) for _, p in found]


def locate(path: str | Path) -> tuple[Path, str] | None:
    """A run dir, its `checkpoints` folder or a step folder -> (latest step folder, backend), or
    None when there is no committed checkpoint there. A missing path is an error."""
    found = committed(path)
    return found[0] if found else None


def find_checkpoint(path: str | Path, backend: str | None = None) -> tuple[Path, str]:
    """`locate`, raising CheckpointError when nothing is there, or (with `backend`) when the
    checkpoint was written by the other backend."""
    where = locate(path)
    if where is None:
        raise CheckpointError(f"{Path(path).absolute()} is not a TnT checkpoint and holds no "
                              f"committed one")
    if backend is not None and where[1] != backend:
        raise CheckpointError(f"{where[0]} is a checkpoint of the {where[1]} backend; resume it "
                              f"with --backend {where[1]} (or load it with tnt_{where[1]})")
    return where


def stale_temp_folders(path: str | Path) -> list[Path]:
    """What interrupted saves and prunes leave under a checkpoints folder: temp folders, `PRUNED`,
    and numbered folders that are not committed steps (a step half deleted by a writer that does
    not rename first). Safe to delete only while no other process writes there: pretrain does it
    holding the run-folder lock."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if any(m in p.name for m in TEMP_MARKERS)
                  or (p.name.isdigit() and p.is_dir() and layout(p) is None))


def prune(step_dir: Path) -> None:
    """Delete a committed step folder so that a kill at any instant leaves either the committed
    step or a folder `stale_temp_folders` lists: rename it into `PRUNED` first (by the only
    writer of the folder, so all of `PRUNED` goes)."""
    pruned = step_dir.parent / PRUNED
    pruned.mkdir(exist_ok=True)
    target = pruned / step_dir.name
    if target.exists():
        shutil.rmtree(target)
    os.replace(step_dir, target)
    kill_point(f"prune:{step_dir.name}")
    shutil.rmtree(pruned, ignore_errors=True)


def empty_pruned(directory: str | Path) -> None:
    """Delete the step folders a writer renamed into `PRUNED` (orbax's `todelete_subdir`); the
    folder itself stays, as a writer may be renaming the next one into it."""
    for old in sorted((Path(str(directory)) / PRUNED).glob("*")):
        if old.is_symlink():  # a step linked in from elsewhere: drop the link, keep its target
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def read_meta(step_dir: Path, kind: str) -> dict:
    """The checkpoint's own JSON metadata, checked (format, version, step = folder name)."""
    if kind == HF:
        return check_meta(hf_export.read_export_meta(step_dir), str(step_dir))
    file = step_dir / META_FILE[kind]
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {file}: {e}") from e
    meta = check_meta(meta, str(step_dir))
    if meta["step"] != int(step_dir.name):
        raise CheckpointError(f"{step_dir} says it is step {meta['step']}, not {step_dir.name}")
    return meta


def run_config(meta: dict, where) -> RunConfig:
    """The run config saved in a checkpoint's metadata; one that this version's validation refuses is a
    CheckpointError naming the checkpoint (so readers fall back and CLIs print one line)."""
    try:
        return RunConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {where} holds a config this version refuses: {e}") from e


def check_config(meta: dict, expected: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint whose model config is not `expected`, naming the fields."""
    diff = config_differences(run_config(meta, where).model, expected)
    if diff:
        raise CheckpointError(f"checkpoint {where} was written for another model: "
                              + "; ".join(diff))


def _read_orbax_params(state_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    import tensorstore as ts

    base = {"driver": "file", "path": str(state_dir) + "/"}
    if (state_dir / "manifest.ocdbt").exists():
        base = {"driver": "ocdbt", "base": f"file://{state_dir}"}
    keys = {k.decode() for k in ts.KvStore.open(base).result().list().result()}
    out = {}
    for name in names:
        key = f"params.{name}"
        driver = "zarr3" if f"{key}/zarr.json" in keys else "zarr"
        if f"{key}/.zarray" not in keys and driver == "zarr":
            raise CheckpointError(f"checkpoint {state_dir.parent} lacks parameter {name}")
        store = ts.open({"driver": driver, "kvstore": {**base, "path": f"{key}/"}}).result()
        out[name] = np.asarray(store.read().result(), dtype=np.float32)
    return out


def read_step(step_dir: Path, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """(canonical float32 params, metadata) of one committed step folder or exported folder."""
    meta = read_meta(step_dir, kind)
    cfg = run_config(meta, step_dir).model
    try:
        if kind == HF:
            params = hf_export.read_export(step_dir)[0]
        elif kind == JAX:
            from tnt.params import param_specs

            params = _read_orbax_params(step_dir / "state", list(param_specs(cfg)))
        else:
            from safetensors.numpy import load_file

            params = load_file(str(step_dir / "params.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore / safetensors raise their own types for bad files
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or partial: {reason(e)}") from e
    try:
        check_canonical(params, cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir} does not match its own config: {e}") from e
    return params, meta


def newest_readable(path: str | Path, read):
    """`read(step_dir, kind)` of the newest committed step under `path` that reads; an older one
    is used with a `CheckpointFallback` warning naming both; the newest's error if none reads.
    A step folder given as `path` is read as is, without fallback."""
    found = committed(path)
    if not found:
        find_checkpoint(path)  # raises the "holds no committed one" error
    first_error = None
    for step_dir, kind in found:
        try:
            result = read(step_dir, kind)
        except CheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            warnings.warn(f"{found[0][0]} is unreadable ({first_error}); using the previous "
                          f"checkpoint {step_dir}", CheckpointFallback, stacklevel=2)
        return result
    raise first_error


def read_canonical(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(canonical float32 params, metadata) of the latest readable checkpoint under `path`,
    either backend (see `newest_readable` for the fallback).

    Raises CheckpointError for a path that is not a checkpoint, a corrupt or partial one, or one
    whose tensors do not match its own config.
    """
    return newest_readable(path, read_step)


def read_for_model(path: str | Path, expect: ModelConfig | None = None):
    """(canonical params, RunConfig, tokenizer, metadata) for a framework's loader. With
    `expect`, a checkpoint whose model config differs is refused, naming the fields."""
    params, meta = read_canonical(path)
    cfg = run_config(meta, path)
    if expect is not None and (diff := config_differences(cfg.model, expect)):
        raise CheckpointError(f"checkpoint {path} does not match the expected model: "
                              + "; ".join(diff))
    tokenizer = tokenizer_from_spec(meta["tokenizer"])
    if tokenizer is not None:  # no real token may be treated as padding, start or end
        check_special_ids(cfg.model, tokenizer, f"checkpoint {path}")
    return params, cfg, tokenizer, meta
