"""Data parallelism for the torch backend: one process per device under `torchrun`, the model
wrapped in `DistributedDataParallel` (gloo on the CPU, NCCL on GPUs), or with `fsdp=true` sharded
by FSDP2 (`fully_shard`, every block and then the root). docs/design.md, "Sharding".

Each rank reads its own rows of every global batch (`rows`, a contiguous share; the batch is
still a pure function of `(seed, step)`). The loss each rank differentiates is rescaled so that
DDP's gradient *average* is the gradient of the global batch's token mean, also when the ranks'
shares hold different numbers of non-pad labels: rank r backpropagates
`loss_r * count_r * world / total`, whose average over ranks is `sum_r nll_r / total`. After the
all-reduce every rank holds the same gradient, so every rank clips, steps and applies the unit-norm
projection identically; only rank 0 writes checkpoints and logs.

Under FSDP2 every parameter (and, through the optimizer, both Adam moments) is a DTensor sharded
on dim 0 over the ranks, built that way (`build_sharded`: on the meta device, then each rank's
shards only, with the values of the one-process init); the reduce-scatter averages gradients as
DDP does, so the same weights apply. The optimizer reduces across shards where a reduction
crosses them (`tnt_torch.optim`), and checkpoints hold full tensors (`full`, gathered on every
rank; rank 0 writes), resharded on load (`like`), so FSDP, DDP and one-process checkpoints are
interchangeable.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from tnt.config import ConfigError, ModelConfig, RunConfig

if TYPE_CHECKING:
    from tnt_torch.model import TnT


FSDP_NEEDS_RANKS = ("fsdp=true shards over the ranks of a multi-process run: launch it with "
                    "torchrun --nproc-per-node N (N > 1); one process has nothing to shard")


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> torch.device:
    """Join the torchrun job (idempotent); returns this rank's device."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except ValueError as e:  # WORLD_SIZE set without torchrun's MASTER_ADDR/MASTER_PORT
            raise ConfigError(f"cannot join a torch process group of WORLD_SIZE="
                              f"{os.environ.get('WORLD_SIZE')} ranks ({e}); launch with "
                              f"torchrun --nproc-per-node N") from e
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard gathered from every rank (a collective: all ranks call
    it), a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard of a DTensor, sharing its storage)."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor `value` laid out as `p` is: sharded like a DTensor `p`, else on its device."""
    value = value.to(p.device)
    return distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value


def shard(net: TnT) -> TnT:
    """FSDP2: each block is one all-gather unit, the root holds the embeddings, lm_head and s_z;
    `fully_shard` turns the parameters into DTensors sharded on dim 0, in place."""
    for stack in (net.encoder, net.decoder):
        for layer in ([] if stack is None else stack.layers):
            fully_shard(layer)
        if stack is not None:
            stack.hooked = True
    fully_shard(net)
    return net


def build_sharded(cfg: ModelConfig, seed: int, device: torch.device) -> TnT:
    """The model under FSDP2 without a whole copy on any device: built on `meta` (shapes only),
    sharded, given storage for this rank's shards on `device` (`to_empty`), and each shard filled
    with its slice of `TnT(cfg, seed)`'s values. Those come from `initial_values`, which draws each
    parameter whole on the CPU from the one seeded generator, in creation order: drawing a slice
    alone would give other numbers (a generator's stream is sequential), so each rank draws every
    parameter in turn, keeps its rows and frees it; the host holds one parameter at a time."""
    from tnt_torch.model import TnT, initial_values

    with torch.device("meta"):
        net = TnT(cfg, seed)
    shard(net)
    net.to_empty(device=device)
    named = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in initial_values(cfg, seed):
            p = named[name]  # every rank holds `value`: slice it locally, no communication
            rows = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                     src_data_rank=None)
            local(p).copy_(local(rows))
    return net


def reshard(net: TnT) -> None:
    """Register the sharded parameters again after a forward without backward (evaluation): the
    root keeps its gathered parameters after its forward, expecting the backward, so until then
    `named_parameters` would name whole plain tensors, not the optimizer's DTensors."""
    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def _no_gradient_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


class _Forward:
    """What `loss_fn` calls: the DDP wrapper's forward, with the model's config."""

    def __init__(self, ddp: DistributedDataParallel, cfg) -> None:
        self.ddp, self.cfg = ddp, cfg

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)


class Replica:
    """This process's part in a data-parallel run (one process alone: rank 0 of 1, no wrapper)."""

    def __init__(self, net: TnT, cfg: RunConfig, device: torch.device) -> None:
        self.net, self.cfg, self.device = net, cfg, device
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        cfg.train.check_rows_split(self.world, f"{self.world} ranks")
        share = cfg.train.batch_size // self.world
        self.rows = slice(self.rank * share, (self.rank + 1) * share)
        self.forward = net
        self.fsdp = cfg.train.fsdp
        if self.fsdp and self.world == 1:
            raise ConfigError(FSDP_NEEDS_RANKS)
        if self.fsdp:
            if not isinstance(net, FSDPModule):  # `build_sharded` shards as it builds
                shard(net)
        elif self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.forward = _Forward(DistributedDataParallel(net, device_ids=ids), net.cfg)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, batch: dict) -> dict:
        """This rank's rows of a global batch (a batch of `rows` already is one)."""
        n = len(next(iter(batch.values())))
        if self.world == 1 or n != self.cfg.train.batch_size:
            return batch
        return {k: v[self.rows] for k, v in batch.items()}

    def global_count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The non-pad labels of the whole global batch (all ranks' rows)."""
        total = (batch["labels"] != self.net.cfg.pad_id).sum()
        if self.world > 1:
            dist.all_reduce(total)
        return total

    def weight(self, count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """The factor that turns a mean over `count` of this rank's labels into its share of the
        global token mean, as DDP's gradient *average* over ranks sees it (see the module doc)."""
        return count * self.world / total.clamp_min(1).to(torch.float32)

    def sync(self, last: bool):
        """A context for one backward: DDP all-reduces (FSDP2 reduce-scatters) only when `last`
        (gradient accumulation's earlier microbatches accumulate locally: `no_sync`,
        `set_requires_gradient_sync(False)`)."""
        if self.world == 1 or last:
            return contextlib.nullcontext()
        return _no_gradient_sync(self.net) if self.fsdp else self.forward.ddp.no_sync()

    def mean(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's mean loss from the rescaled per-rank losses (for logging)."""
        if self.world == 1:
            return loss
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return loss / self.world

    def sum(self, *values: float) -> tuple[float, ...]:
        """Sums over the ranks of a few float64 numbers (e.g. an evaluation's loss and tokens)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple(t.tolist())
