"""The torch train step and the torch backend of `experiments.pretrain` (mirror of
`tnt_jax/train.py`).

The train state is the model (canonical parameters), the `TnTOptimizer` (Adam moments, eigen
LRs, schedule position) and its step count. One `step()` is forward and backward (over
`grad_accum` microbatches, `accumulate_grads`) and the full TnT update (clip, AdamW with eigen
LRs, schedule, unit-norm projection).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from tnt import checkpoint_io
from tnt.checkpoint_meta import adam_moment_factors, make_meta
from tnt.config import RunConfig, TrainConfig
from tnt.data import check_token_ids
from tnt_torch import checkpoint, distributed
from tnt_torch.generate import inference
from tnt_torch.model import TnT, load_canonical, loss_fn, to_canonical
from tnt_torch.optim import TnTOptimizer


def configure_threads() -> None:
    """Use every core for intra-op parallelism on the CPU unless the user chose otherwise."""
    if "OMP_NUM_THREADS" not in os.environ:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)


def want_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to compile the blocks: the `compile` field, or with `compile=none`, on for CUDA and
    off elsewhere: on the CPU a compiled step is not clearly faster (README, "torch.compile")
    and the first one costs tens of seconds; on a GPU inductor fuses the many elementwise ops of
    the normalized residual, RoPE and the q/k norms into few kernels. FSDP2 with compile is
    refused by the config (`TrainConfig`)."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and not cfg.fsdp


def microbatches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Microbatch i is rows i, i+n, i+2n, ... of the global batch (the split of
    `tnt_jax.train.microbatches`)."""
    rows = batch["labels"].shape[0]
    if rows % n:
        raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={n}")
    return [{k: v[i::n] for k, v in batch.items()} for i in range(n)]


@torch.no_grad()
def token_sum(model: TnT, batch: dict[str, torch.Tensor], grad_accum: int = 1) -> tuple[float, int]:
    """(summed nats over the non-pad labels, their count) of a batch, run as `grad_accum`
    microbatches like the train step: evaluation never holds more activations than a training
    microbatch (the mirror of `tnt_jax.train.make_eval_step`)."""
    total, count = 0.0, 0
    for micro in microbatches(batch, grad_accum):
        loss, c = loss_fn(model, micro)
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
    all-reduces (`Replica.sync`); the earlier ones accumulate locally.
    """
    parts = microbatches(batch, grad_accum)
    count = replica.global_count(batch)
    loss = torch.zeros((), dtype=torch.float32, device=count.device)
    for i, micro in enumerate(parts):
        with replica.sync(i == len(parts) - 1):
            part, part_count = loss_fn(replica.forward, micro)
            weighted = part * replica.weight(part_count, count)
            weighted.backward()
        loss += weighted.detach()
    return replica.mean(loss), count


class TorchBackend:
    """What `experiments.pretrain` needs from a framework: init, step, evaluate, save, restore.

    With `compile` on (the config field, `want_compile`) the blocks go through `torch.compile`,
    also under DDP; if the first compiled step fails (no C++ compiler, an unsupported
    platform), the backend warns and continues eagerly. Compiled and eager steps differ by float
    rounding only.
    """

    name = "torch"

    def __init__(self, cfg: RunConfig, device: str | torch.device | None = None) -> None:
        configure_threads()
        self.cfg = cfg
        if distributed.launched():  # a torchrun rank: one device per process, DDP or FSDP2
            device = distributed.init_process_group()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = TnT(cfg.model, seed=cfg.train.seed).to(self.device)
        self.replica = distributed.Replica(self.net, cfg, self.device)
        self.rows = self.replica.rows
        self.opt = TnTOptimizer(self.net, cfg.model, cfg.train)
        self.directory, self.keep = None, None
        self.compiled = want_compile(cfg.train, self.device)
        self._unproven = self.compiled  # the first compiled step may still fall back
        if self.compiled:
            self.net.compile_blocks()

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.replica.share(batch).items():
            check_token_ids(value, self.cfg.model.vocab_size, key)
            out[key] = torch.as_tensor(np.asarray(value, np.int64), device=self.device)
        return out

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        self.net.train()
        tensors = self._put(batch)
        accum = self.cfg.train.grad_accum
        if self._unproven:
            try:
                loss, count = accumulate_grads(self.replica, tensors, accum)
            except ValueError:
                raise
            except Exception as e:  # inductor/dynamo failures come in many types
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training "
                              f"eagerly", RuntimeWarning, stacklevel=2)
                self.net.compile_blocks(False)
                self.compiled = False
                self.opt.zero_grad(set_to_none=True)
                loss, count = accumulate_grads(self.replica, tensors, accum)
            self._unproven = False
        else:
            loss, count = accumulate_grads(self.replica, tensors, accum)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": self.opt.last_grad_norm, "tokens": count}

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Token-weighted mean loss over `batches`."""
        self.net.eval()
        total, count = 0.0, 0
        for batch in batches:
            s, c = token_sum(self.net, self._put(batch), self.cfg.train.grad_accum)
            total, count = total + s, count + c
        if self.replica.fsdp:
            distributed.reshard(self.net)
        total, count = self.replica.sum(total, count)  # each rank evaluated its rows
        return total / max(count, 1)

    @property
    def step_count(self) -> int:
        return self.opt.step_count

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """Some parameters as numpy (e.g. the alphas for logging)."""
        named = dict(self.net.named_parameters())  # FSDP2: gathered on every rank
        return {n: distributed.full(named[n].detach()).cpu().numpy().copy() for n in names}

    def nonfinite(self) -> list[str]:
        """Parameters holding a NaN or an infinity: one flag each computed on the device (under
        FSDP2 each rank checks its shards and the flags are summed over the ranks)."""
        named = list(self.net.named_parameters())
        bad = torch.stack([(~torch.isfinite(distributed.local(p.detach()))).any() for _, p in named])
        flags = self.replica.sum(*bad.double().tolist())
        return [n for (n, _), b in zip(named, flags, strict=True) if b]

    def model(self) -> TnT:
        """The trained module (under FSDP2 its parameters are this rank's shards)."""
        return self.net

    def open(self, directory, keep: int) -> None:
        self.directory, self.keep = directory, keep

    def save(self, tokenizer_spec: dict) -> None:
        if self.directory is None:
            raise RuntimeError("call open(directory, keep) before save()")
        if not (self.replica.main or self.replica.fsdp):  # DDP: every rank holds the same state
            return
        params, state = to_canonical(self.net), self.opt.canonical_state()  # FSDP2: all gather
        if not self.replica.main:  # rank 0 writes
            return
        step = self.step_count
        meta = make_meta(self.name, step, self.cfg, tokenizer_spec)
        checkpoint.save(self.directory, step, params, state, meta, self.keep)

    def wait(self) -> None:
        """Saves are synchronous; nothing to wait for."""

    def restore(self, path) -> dict:
        step_dir, _ = checkpoint_io.find_checkpoint(path, self.name)
        params, opt_state, meta = checkpoint.restore(step_dir, self.cfg.model)
        load_canonical(self.net, params)
        try:
            self.opt.load_canonical_state(opt_state, meta["step"],
                                          adam_moment_factors(meta, self.cfg.model))
        except (KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {e}") from e
        return meta

    def sample(self, tokenizer, prompt: str, n: int, temperature: float = 0.0,
               seed: int = 0) -> str:
        """`inference` of up to `n` new tokens from `prompt` (the end-of-run sample): greedy, or
        sampled at `temperature` with `seed`."""
        net = self.net
        if self.replica.fsdp:  # decoding calls more than forward: a whole copy on every rank
            net = load_canonical(TnT(self.cfg.model), to_canonical(self.net)).to(self.device)
        return inference(net, tokenizer, prompt, max_length=n, temperature=temperature,
                         seed=seed)
