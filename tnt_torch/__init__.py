"""TnT in PyTorch: the same model, parameter for parameter, as tnt_jax; the optimizer step with
eigen LRs and the unit-norm projection, safetensors checkpoints, generation (`inference`) and
the `tnt.backend` adapter (`tnt_torch.backend`)."""

from tnt.malloc import reuse_freed_blocks

reuse_freed_blocks()  # before torch starts its threads (tnt/malloc.py)

from tnt_torch.checkpoint import load_checkpoint, save_checkpoint
from tnt_torch.generate import inference
from tnt_torch.model import TnT, load_canonical, loss_fn, to_canonical
from tnt_torch.optim import TnTOptimizer, UnitNormProjection, build_optimizer
from tnt_torch.reference import import_reference

__all__ = ["TnT", "TnTOptimizer", "UnitNormProjection", "build_optimizer", "import_reference", "inference",
           "load_canonical", "load_checkpoint", "loss_fn", "save_checkpoint", "to_canonical"]
