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

from tnt.config import TrainConfig, microbatch_rows
from tnt.threads import available_cores
from tnt_torch import distributed
from tnt_torch.model import TnT, loss_fn


def configure_threads() -> None:
    """Intra-op threads: `OMP_NUM_THREADS` (`--threads`, `tnt.threads`) when set, else every core
    this process may use; inter-op threads at most as many (settable once, before any parallel
    work: left as they are after that)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    n = int(env) if env.isdigit() and int(env) > 0 else available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if torch.get_num_interop_threads() > n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # the inter-op pool has started already
            pass


def want_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to compile the blocks: the `compile` field, or with `compile=none`, on for CUDA and
    off elsewhere: on the CPU the first compiled step costs tens of seconds, more than a run of a
    few hundred steps wins back at ~1.2x per step (docs/scale.md, docs/results.md); on a GPU
    inductor fuses the many elementwise ops of the normalized residual, RoPE and the q/k norms
    into few kernels. FSDP2 with compile is refused by the config (`TrainConfig`)."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and not cfg.fsdp


def microbatches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Microbatch i is rows i, i+n, i+2n, ... of the global batch (the split of
    `tnt_jax.train.microbatches`)."""
    microbatch_rows(batch["labels"].shape[0], n)
    return [{k: v[i::n] for k, v in batch.items()} for i in range(n)]


@torch.no_grad()
def token_sum(model: TnT, batch: dict[str, torch.Tensor], grad_accum: int = 1, *,
              padded: bool | None = None) -> tuple[float, int]:
    """(summed nats over the non-pad labels, their count) of a batch, run as `grad_accum`
    microbatches like the train step: evaluation never holds more activations than a training
    microbatch (the mirror of `tnt_jax.train.token_sum`, which returns device arrays). The
    batch's ids were validated where it was built (the backend), so the forward reads nothing
    back to check them; `padded` says whether its inputs hold a pad (`TnT.forward`)."""
    total, count = 0.0, 0
    for micro in microbatches(batch, grad_accum):
        loss, c = loss_fn(model, micro, check_ids=False, padded=padded)
        total, count = total + float(loss) * int(c), count + int(c)
    return total, count


def accumulate_grads(replica: distributed.Replica, batch: dict[str, torch.Tensor],
                     grad_accum: int = 1, *, padded: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this process's rows of the global batch in `grad_accum`
    microbatches; returns the global (loss, label tokens) and leaves the global batch's gradient
    in `.grad` (on every rank, after DDP's all-reduce).

    The loss is the mean over the non-pad labels of the WHOLE global batch, so each microbatch's
    mean is weighted by its share of the global tokens (`Replica.weight`) before its backward: the
    summed gradients are then those of one big batch (the mirror of
    `tnt_jax.train.accumulate_grads`, which returns the gradients instead). Under DDP only the
    last microbatch's backward all-reduces (`Replica.sync`); the earlier ones accumulate locally.
    The batch's ids were validated where it was built (the backend's `_put`), not again per
    microbatch, and whether its inputs hold a pad is known there too (`padded`, see
    `TnT.forward`): the forward reads nothing back from the device.
    """
    parts = microbatches(batch, grad_accum)
    count = replica.global_count(batch)
    loss = torch.zeros((), dtype=torch.float32, device=count.device)
    for i, micro in enumerate(parts):
        with replica.sync(i == len(parts) - 1):
            part, part_count = loss_fn(replica.forward, micro, check_ids=False, padded=padded)
            weighted = part * replica.weight(part_count, count)
            weighted.backward()
        loss += weighted.detach()
    return replica.mean(loss), count
