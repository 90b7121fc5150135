"""orbax checkpoints of a JAX run: params, optimizer state, step, plus JSON metadata.

Layout: `RUN_DIR/checkpoints/<step>/{state,meta}`. orbax writes each step to a temporary folder
and renames it on commit, so a crash never leaves a half-written step that looks complete, and
the manager keeps only the last `keep` steps.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tnt.checkpoint_io import read_for_model
from tnt.checkpoint_meta import CheckpointError, check_meta, config_differences
from tnt.config import ModelConfig, RunConfig
from tnt_jax.model import TnT, load_canonical


def open_manager(directory: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                               meta=ocp.args.JsonSave(meta)))


def resolve(path: str | Path) -> tuple[Path, int]:
    """A run dir, its `checkpoints` folder, or one step folder -> (checkpoints folder, step)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "meta").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir()
                   if p.name.isdigit() and (p / "meta").is_dir())
    if not steps:
        raise CheckpointError(f"{path} holds no committed checkpoint")
    return path, steps[-1]


def read_meta(path: str | Path) -> tuple[Path, int, dict]:
    directory, step = resolve(path)
    try:
        meta = open_manager(directory).restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many types for corrupt folders
        raise CheckpointError(f"cannot read checkpoint metadata at {directory / str(step)}: {e}") from e
    return directory, step, check_meta(meta, str(directory / str(step)))


def restore(path: str | Path, target: dict, expected: ModelConfig) -> tuple[dict, dict]:
    """Restore a train state shaped like `target` (arrays or ShapeDtypeStructs, with shardings).

    The stored model config must equal `expected`; differences are listed by field name.
    """
    directory, step, meta = read_meta(path)
    stored = RunConfig.from_dict(meta["config"]).model
    diff = config_differences(stored, expected)
    if diff:
        raise CheckpointError(f"checkpoint {directory / str(step)} was written for another model: "
                              + "; ".join(diff))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        state = open_manager(directory).restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)))).state
    except Exception as e:
        raise CheckpointError(f"checkpoint {directory / str(step)} is corrupt or does not match "
                              f"the model: {e}") from e
    return state, meta


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None):
    """(model, run config, tokenizer) from a checkpoint written by either backend's pretrain.

    `path` is a run dir, its `checkpoints` folder or one step folder. With `expect`, a checkpoint
    whose model config differs is refused, naming the fields.
    """
    params, cfg, tokenizer = read_for_model(path, expect)
    model = load_canonical(nnx.eval_shape(lambda: TnT(cfg.model, nnx.Rngs(0))), params)
    return model, cfg, tokenizer
