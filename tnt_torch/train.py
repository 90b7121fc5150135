"""The torch train and evaluation steps (mirror of `tnt_jax/train.py`; the training state
around them is `tnt_torch.backend.Trainer`).

The train state is the model (canonical parameters), the `TnTOptimizer` (Adam moments, eigen
LRs, schedule position) and its step count. One `step()` is forward and backward (over
`grad_accum` microbatches, `accumulate_grads`) and the full TnT update (clip, AdamW with eigen
LRs, schedule, unit-norm projection).
"""

from __future__ import annotations

import os

import torch

from tnt.config import microbatch_rows
from tnt_torch import distributed
from tnt_torch.model import TnT, loss_fn


def configure_threads() -> None:
    """Use every core for intra-op parallelism on the CPU unless the user chose otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)


COMPILE_ENV = "TNT_TORCH_COMPILE"


def want_compile(compile: bool | None = None) -> bool:
    """Whether to compile the blocks: the argument, else `TNT_TORCH_COMPILE=1`; off by default.

    Measured on the 2-core CPU, decoder_only d256 L4 H4, batch 8 x 256, vocab 320
    (`experiments.bench`): eager 365 ms/step (5.6k tok/s), compiled 350-360 ms/step; one thread:
    10-15% less CPU time per step, also on the `cpu` preset. The first compile costs 30-40 s (2-3 s
    once inductor's on-disk cache is warm), so it pays only for runs of many minutes.
    """
    if compile is not None:
        return compile
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def microbatches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Microbatch i is rows i, i+n, i+2n, ... of the global batch (the split of
    `tnt_jax.train.microbatches`)."""
    microbatch_rows(batch["labels"].shape[0], n)
    return [{k: v[i::n] for k, v in batch.items()} for i in range(n)]


@torch.no_grad()
def token_sum(model: TnT, batch: dict[str, torch.Tensor], grad_accum: int = 1) -> tuple[float, int]:
    """(summed nats over the non-pad labels, their count) of a batch, run as `grad_accum`
    microbatches like the train step: evaluation never holds more activations than a training
    microbatch (the mirror of `tnt_jax.train.make_eval_step`). The batch's ids were validated
    where it was built (the backend), so the forward reads nothing back to check them."""
    total, count = 0.0, 0
    for micro in microbatches(batch, grad_accum):
        loss, c = loss_fn(model, micro, check_ids=False)
        total, count = total + float(loss) * int(c), count + int(c)
    return total, count


def accumulate_grads(replica: distributed.Replica, batch: dict[str, torch.Tensor],
                     grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this process's rows of the global batch in `grad_accum`
    microbatches; returns the global (loss, label tokens) and leaves the global batch's gradient
    in `.grad` (on every rank, after DDP's all-reduce).

    The loss is the mean over the non-pad labels of the WHOLE global batch, so each microbatch's
    mean is weighted by its share of the global tokens (`Replica.weight`) before its backward: the
    summed gradients are then those of one big batch (the mirror of
    `tnt_jax.train.accumulated_grads`). Under DDP only the last microbatch's backward
    all-reduces (`Replica.sync`); the earlier ones accumulate locally. The batch's ids were
    validated where it was built (the backend's `_put`), not again per microbatch.
    """
    parts = microbatches(batch, grad_accum)
    count = replica.global_count(batch)
    loss = torch.zeros((), dtype=torch.float32, device=count.device)
    for i, micro in enumerate(parts):
        with replica.sync(i == len(parts) - 1):
            part, part_count = loss_fn(replica.forward, micro, check_ids=False)
            weighted = part * replica.weight(part_count, count)
            weighted.backward()
        loss += weighted.detach()
    return replica.mean(loss), count
