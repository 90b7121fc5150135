"""TnT in JAX / Flax NNX: the model, its optax transforms, the train step, checkpoints and
generation (`inference`)."""

from tnt.malloc import reuse_freed_blocks

reuse_freed_blocks()  # before jax starts its threads (tnt/malloc.py)

from tnt_jax.checkpoint import load_checkpoint, save_checkpoint
from tnt_jax.generate import inference
from tnt_jax.model import TnT, load_canonical, loss_fn, to_canonical
from tnt_jax.optim import build_optimizer, scale_by_eigen_lr, unit_norm_projection

__all__ = ["TnT", "build_optimizer", "inference", "load_canonical", "load_checkpoint", "loss_fn",
           "save_checkpoint", "scale_by_eigen_lr", "to_canonical", "unit_norm_projection"]
