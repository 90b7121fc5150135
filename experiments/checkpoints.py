"""Find and read a checkpoint of either backend as canonical numpy parameters.

The backend is told by the step folder's layout (DESIGN.md's checkpoint formats):
- torch: `<step>/params.safetensors` + `<step>/meta.json`, read with `safetensors.numpy`
  (no torch import);
- jax (orbax): `<step>/state/` + `<step>/meta/`, read with `tnt_jax.checkpoint.read_params`.
Both give the canonical `[in, out]` float32 names of `tnt/params.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tnt.checkpoint_meta import CheckpointError, check_meta
from tnt.config import RunConfig
from tnt.params import check_canonical


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


def layout(step_dir: Path) -> str | None:
    """"jax", "torch", or None when `step_dir` is not a committed checkpoint step folder."""
    if not step_dir.name.isdigit() or not step_dir.is_dir():
        return None
    if (step_dir / "params.safetensors").is_file() and (step_dir / "meta.json").is_file():
        return "torch"
    if (step_dir / "state").is_dir() and (step_dir / "meta").is_dir():
        return "jax"
    return None


def locate(path: str | Path) -> tuple[Path, str] | None:
    """A run dir, its `checkpoints` folder or a step folder -> (latest step folder, backend);
    None when there is no committed checkpoint there."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    kind = layout(path)
    if kind:
        return path, kind
    found = sorted((int(p.name), p) for p in path.iterdir() if layout(p)) if path.is_dir() else []
    if not found:
        return None
    return found[-1][1], layout(found[-1][1])


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The canonical params and metadata of the latest checkpoint under `path`, either backend."""
    where = locate(path)
    if where is None:
        raise CheckpointError(f"{Path(path).absolute()} holds no committed TnT checkpoint")
    step_dir, kind = where
    if kind == "jax":
        from tnt_jax.checkpoint import read_params

        params, meta = read_params(step_dir)
    else:
        from safetensors.numpy import load_file

        try:
            meta = check_meta(json.loads((step_dir / "meta.json").read_text()), str(step_dir))
            params = load_file(str(step_dir / "params.safetensors"))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type for a bad file
            raise CheckpointError(f"checkpoint {step_dir} is corrupt: {e}") from e
    cfg = RunConfig.from_dict(meta["config"]).model
    try:
        check_canonical(params, cfg)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir} does not match its own config: {e}") from e
    return Checkpoint({k: np.asarray(v, np.float32) for k, v in params.items()}, meta, kind,
                      step_dir)
