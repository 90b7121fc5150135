"""orbax checkpoints of a JAX run: params, optimizer state, step, plus JSON metadata. Writing and
restoring onto devices only; locating and reading checkpoints is `tnt.checkpoint_io`'s.

Layout: `RUN_DIR/checkpoints/<step>/{state,meta}`. orbax writes each step to a temporary folder
and renames it on commit, so a crash never leaves a half-written step that looks complete, and
the manager keeps only the last `keep` steps (`open_manager`).
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tnt import checkpoint_io
from tnt.backend import Loaded
from tnt.checkpoint_io import read_for_model
from tnt.checkpoint_meta import CheckpointError, CheckpointWriteError, custom_loop_meta, kill_point, reason
from tnt.config import ModelConfig
from tnt_jax.model import TnT, load_canonical, to_canonical


class _BackgroundWriteErrors(logging.Filter):
    """orbax logs a failed background write with its whole traceback, then raises the error in
    the main thread, where `save`/`wait` turn it into one CheckpointWriteError line: drop the
    log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname)


logging.getLogger("absl").addFilter(_BackgroundWriteErrors())


def open_manager(directory: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    """A manager keeping the last `keep` steps; orbax deletes a step file by file, so a pruned
    step is first renamed into `checkpoint_io.PRUNED` (a kill then leaves no partial step)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None,
                                           todelete_subdir=checkpoint_io.PRUNED)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    """Start writing step `step` (orbax finishes it in the background; `wait` joins it). A write
    that fails, now or in the background, is a CheckpointWriteError here or in `wait`."""
    checkpoint_io.empty_pruned(manager.directory)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax raises the previous save's error, or its own, many types
        raise _write_error(manager, e) from e
    kill_point(f"save:{step}")  # orbax is still writing (asynchronously) here


def wait(manager: ocp.CheckpointManager) -> None:
    """Let the save in flight commit, then delete the steps it pruned."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _write_error(manager, e) from e
    shutil.rmtree(Path(str(manager.directory)) / checkpoint_io.PRUNED, ignore_errors=True)


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
    return CheckpointWriteError(f"cannot write a checkpoint in {manager.directory}: {reason(error)}; "
                                f"the steps committed before it are intact")


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
        problem = reason(e)
    else:
        return state, meta
    _drop_failed_reads()
    raise CheckpointError(f"checkpoint {step_dir} is corrupt or does not match the model: {problem}")


def _drop_failed_reads() -> None:
    """Collect the read coroutines a failed orbax restore leaves behind, each holding an error
    with the whole store spec, which Python would otherwise print (dozens of lines per array) as
    "Exception ignored" when it frees them; the one-line CheckpointError says it all."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


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


def save_checkpoint(path: str | Path, model, cfg, tokenizer, step: int) -> Path:
    """Save a custom training loop's `model` as step `step` of the run folder `path` (its
    `checkpoints/<step>/`, written by orbax and committed atomically) with `cfg` (the RunConfig or
    the model's ModelConfig) and `tokenizer`. `load_checkpoint`, `experiments.generate` and either
    framework read it; it holds no optimizer state, so pretrain cannot `--resume` from it."""
    import jax.numpy as jnp

    meta = custom_loop_meta("jax", step, cfg, model.cfg, tokenizer)
    directory = Path(path) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    manager = open_manager(directory)
    state = {"params": {k: jnp.asarray(v) for k, v in to_canonical(model).items()},
             "step": jnp.int32(step)}
    try:
        save(manager, step, state, meta)
        wait(manager)
    finally:
        manager.close()
    return directory / str(step)
