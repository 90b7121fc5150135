"""Read the canonical parameters of a checkpoint written by either backend, without either
framework: the cross-framework loaders (`tnt_jax.load_checkpoint`, `tnt_torch.load_checkpoint`)
and the analysis tools stand on this.

Two layouts exist under `RUN_DIR/checkpoints/<step>/`:
- jax (orbax): `state/` (an OCDBT key-value store of zarr arrays, read here with tensorstore,
  the library orbax itself writes with) and `meta/metadata` (JSON);
- torch: `params.safetensors` and `meta.json` (read with safetensors' numpy API).
Both hold the same canonical names, `[in, out]` layout, float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tnt.checkpoint_meta import CheckpointError, check_meta, config_differences
from tnt.config import ModelConfig, RunConfig
from tnt.params import check_canonical
from tnt.special_ids import check_special_ids
from tnt.tokenizer import tokenizer_from_spec

JAX, TORCH = "jax", "torch"


def layout(step_dir: Path) -> str | None:
    """Which backend wrote a step folder, or None if it is not a committed checkpoint."""
    if not step_dir.name.isdigit():
        return None
    if (step_dir / "state").is_dir() and (step_dir / "meta").is_dir():
        return JAX
    if (step_dir / "params.safetensors").is_file() and (step_dir / "meta.json").is_file():
        return TORCH
    return None


def locate(path: str | Path) -> tuple[Path, str] | None:
    """A run dir, its `checkpoints` folder or a step folder -> (latest step folder, backend), or
    None when there is no committed checkpoint there. A missing path is an error."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    kind = layout(path)
    if kind:
        return path, kind
    found = sorted((int(p.name), p) for p in path.iterdir() if layout(p)) if path.is_dir() else []
    return (found[-1][1], layout(found[-1][1])) if found else None


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """`locate`, raising CheckpointError when nothing is there."""
    where = locate(path)
    if where is None:
        raise CheckpointError(f"{Path(path).absolute()} is not a TnT checkpoint and holds no "
                              f"committed one")
    return where


def read_meta(step_dir: Path, kind: str) -> dict:
    file = step_dir / ("meta/metadata" if kind == JAX else "meta.json")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {file}: {e}") from e
    return check_meta(meta, str(step_dir))


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


def read_canonical(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(canonical float32 params, metadata) of the latest checkpoint under `path`, either backend.

    Raises CheckpointError for a path that is not a checkpoint, a corrupt or partial one, or one
    whose tensors do not match its own config.
    """
    step_dir, kind = find_checkpoint(path)
    meta = read_meta(step_dir, kind)
    cfg = RunConfig.from_dict(meta["config"]).model
    try:
        if kind == JAX:
            from tnt.params import param_specs

            params = _read_orbax_params(step_dir / "state", list(param_specs(cfg)))
        else:
            from safetensors.numpy import load_file

            params = load_file(str(step_dir / "params.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore / safetensors raise their own types for bad files
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or partial: {e}") from e
    try:
        check_canonical(params, cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir} does not match its own config: {e}") from e
    return params, meta


def read_for_model(path: str | Path, expect: ModelConfig | None = None):
    """(canonical params, RunConfig, tokenizer) for a framework's `load_checkpoint`. With
    `expect`, a checkpoint whose model config differs is refused, naming the fields."""
    params, meta = read_canonical(path)
    cfg = RunConfig.from_dict(meta["config"])
    if expect is not None and (diff := config_differences(cfg.model, expect)):
        raise CheckpointError(f"checkpoint {path} does not match the expected model: "
                              + "; ".join(diff))
    tokenizer = tokenizer_from_spec(meta["tokenizer"])
    if tokenizer is not None:  # no real token may be treated as padding, start or end
        check_special_ids(cfg.model, tokenizer, f"checkpoint {path}")
    return params, cfg, tokenizer
