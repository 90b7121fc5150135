"""orbax checkpoints of a JAX run: params, optimizer state, step, plus JSON metadata. Writing and
restoring onto devices only; locating and reading checkpoints is `tnt.checkpoint_io`'s.

Layout: `RUN_DIR/checkpoints/<step>/{state,meta}`. orbax writes each step to a temporary folder
and renames it on commit, so a crash never leaves a half-written step that looks complete, and
the manager keeps only the last `keep` steps.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tnt import checkpoint_io
from tnt.backend import Loaded
from tnt.checkpoint_io import read_for_model
from tnt.checkpoint_meta import CheckpointError, kill_point
from tnt.config import ModelConfig
from tnt_jax.model import TnT, load_canonical


def open_manager(directory: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                               meta=ocp.args.JsonSave(meta)))
    kill_point(f"save:{step}")  # orbax is still writing (asynchronously) here


def restore(step_dir: str | Path, target: dict, expected: ModelConfig) -> tuple[dict, dict]:
    """Restore the train state of one committed step folder (`tnt.checkpoint_io` locates it),
    shaped like `target` (arrays or ShapeDtypeStructs, with shardings), through orbax's public
    restore onto the target's devices.

    The stored model config must equal `expected`; differences are listed by field name.
    """
    step_dir = Path(step_dir).absolute()
    meta = checkpoint_io.read_meta(step_dir, checkpoint_io.JAX)
    checkpoint_io.check_config(meta, expected, step_dir)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        state = open_manager(step_dir.parent).restore(int(step_dir.name), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)))).state
    except Exception as e:  # orbax raises many types for corrupt folders
        raise CheckpointError(f"checkpoint {step_dir} is corrupt or does not match the model: "
                              f"{e}") from e
    return state, meta


def load(path: str | Path, expect: ModelConfig | None = None) -> Loaded:
    """The model of the newest readable checkpoint under `path` (either backend's layout) with
    its config, tokenizer and metadata. With `expect`, a checkpoint whose model config differs
    is refused, naming the fields."""
    params, cfg, tokenizer, meta = read_for_model(path, expect)
    model = load_canonical(nnx.eval_shape(lambda: TnT(cfg.model, nnx.Rngs(0))), params)
    return Loaded(model, cfg, tokenizer, meta)


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None):
    """(model, run config, tokenizer) from a checkpoint written by either backend's pretrain.

    `path` is a run dir, its `checkpoints` folder or one step folder. With `expect`, a checkpoint
    whose model config differs is refused, naming the fields.
    """
    loaded = load(path, expect)
    return loaded.model, loaded.cfg, loaded.tokenizer
