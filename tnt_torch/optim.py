"""The TnT optimizer in PyTorch: one `step()` does docs/design.md's whole update, in its order:

    eigen-LR multipliers -> clip -> Adam -> weight decay (rmsnorm) -> eigen-LR multipliers
    -> learning rate -> apply -> unit-norm projection (ngpt)

`TnTOptimizer` is a `torch.optim.AdamW` whose parameter groups carry the eigen learning rates of
`tnt.params.param_specs` (group lr = schedule(step) * eigen_lr; decoupled decay only on the specs
with `weight_decay`), and whose `step()` also multiplies each group's gradients by its eigen_lr
and clips them, sets the shared schedule (`tnt.schedule.learning_rate`) and projects the ngpt
matrices back onto the unit sphere. Anyone
writing their own loop calls `loss.backward(); opt.step(); opt.zero_grad()` and cannot forget a
piece (the mirror of the optax chain in `tnt_jax/optim.py`).

The two multiplications by `m = eigen_lr` reproduce the nGPT reference's storage of each scaler at
`p / m` (docs/design.md, "The scalers"): the clip and Adam see its stored gradient `m g`, and its
step is `m` times Adam's. Adam's moments (`exp_avg`, `exp_avg_sq`) are therefore those of `m g`.

Equivalence with the optax chain: optax applies `p -= lr * e * (adam + wd * p)`; AdamW applies
`p -= lr_g * wd * p + lr_g * adam` with `lr_g = lr * e`: the same update.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from tnt.config import ModelConfig, TrainConfig
from tnt.params import check_names, param_specs
from tnt.schedule import learning_rate
from tnt_torch.distributed import full, like, local

ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _sharded_on(t: torch.Tensor, axis: int) -> bool:
    """Whether `t` is a DTensor split along `axis` (an FSDP2 parameter is split on dim 0)."""
    return isinstance(t, DTensor) and any(isinstance(pl, Shard) and pl.dim == axis
                                          for pl in t.placements)


def _sum_over_shards(parts: list[torch.Tensor], sharded: list[bool], group) -> None:
    """Sum, in place and in one all-reduce, the entries of `parts` flagged `sharded` over the
    ranks (each rank holds a partial sum over its shard)."""
    chosen = [t for t, s in zip(parts, sharded, strict=True) if s]
    if not chosen:
        return
    flat = torch.cat([t.reshape(-1) for t in chosen])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(chosen, [f.view_as(t) for f, t in
                                  zip(flat.split([t.numel() for t in chosen]), chosen, strict=True)])


def _group(ps: list[torch.Tensor]):
    return next((p.device_mesh.get_group() for p in ps if isinstance(p, DTensor)), None)


class UnitNormProjection:
    """`p <- p / max(||p||, 1e-12)` along each matrix's d_model axis (docs/design.md, "Unit-norm
    projection"), batched with `_foreach` ops: squares, square roots, clamps and divisions each run
    as one call over all matrices normalized along the same axis; only the per-matrix reduction
    is a Python loop. (`(x*x).sum(axis)` is ~10x faster than `vector_norm` along a leading axis on
    the CPU, and stacking same-shaped matrices would copy every one of them.)

    Under FSDP2 each rank works on its shard (`to_local`); a matrix split along its normalized
    axis (dim 0: wq, wk, wv, w_in, lm_head) has its squared sums added over the ranks (one
    all-reduce per axis) before the division, so every shard is divided by the whole column's
    norm."""

    def __init__(self, params_axes: list[tuple[torch.Tensor, int]]) -> None:
        groups: dict[int, list[torch.Tensor]] = defaultdict(list)
        for p, axis in params_axes:
            groups[axis % p.ndim].append(p)
        self.groups = list(groups.items())

    @torch.no_grad()
    def __call__(self) -> None:
        for axis, ps in self.groups:
            parts = [local(p) for p in ps]
            norms = [sq.sum(axis, keepdim=True) for sq in torch._foreach_mul(parts, parts)]
            _sum_over_shards(norms, [_sharded_on(p, axis) for p in ps], _group(ps))
            torch._foreach_sqrt_(norms)
            torch._foreach_clamp_min_(norms, 1e-12)
            torch._foreach_div_(parts, norms)


@torch.no_grad()
def clip_grad_norm(groups: list[tuple[list[torch.Tensor], float]], max_norm: float) -> torch.Tensor:
    """Multiply each group's gradients by its multiplier `m` (the stored gradients `m g`), then
    clip them as optax.clip_by_global_norm does: all scaled by min(1, max_norm / ||m g||), no
    epsilon (unlike torch.nn.utils.clip_grad_norm_). One norm per tensor serves both the clip
    and the returned value, the global norm of the gradients as they came, `||g||` (what
    tnt_jax's train step reports). FSDP2 gradients are shards: each rank's squared norms are
    summed over the ranks (one all-reduce) before the clip."""
    scaled = [([local(p.grad) for p in ps if p.grad is not None], m) for ps, m in groups]
    sharded = [isinstance(p.grad, DTensor) for ps, _ in groups for p in ps if p.grad is not None]
    grads = [g for gs, _ in scaled for g in gs]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads))
    if any(sharded):
        squares = list(norms.square().unbind())
        _sum_over_shards(squares, sharded, _group([p.grad for ps, _ in groups for p in ps
                                                   if p.grad is not None]))
        norms = torch.stack(squares).sqrt()
    # each norm times its group's multiplier, as Python scalars: no host-to-device copy per step
    scaled_norms = torch._foreach_mul(list(norms.unbind()), [m for gs, m in scaled for _ in gs])
    coef = (max_norm / torch.linalg.vector_norm(torch.stack(scaled_norms))).clamp(max=1.0)
    for gs, m in scaled:
        if gs:
            torch._foreach_mul_(gs, coef * m)
    return torch.linalg.vector_norm(norms)


class TnTOptimizer(torch.optim.AdamW):
    """AdamW with eigen-LR parameter groups, the shared schedule, global-norm clipping and the
    ngpt unit-norm projection, all inside `step()`. `step_count` is the number of updates done
    (update k uses `learning_rate(k, ...)`); it is saved by `state_dict()`."""

    def __init__(self, model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 fused: bool | None = None) -> None:
        t = train_cfg.resolved(model_cfg.norm)
        specs = param_specs(model_cfg)
        named = dict(model.named_parameters())
        check_names(named, model_cfg, "model parameters")
        self.model_cfg = model_cfg
        self.name_of = {named[n]: n for n in specs}
        groups: dict[tuple[float, bool], list[torch.Tensor]] = defaultdict(list)
        for name, spec in specs.items():
            groups[(spec.eigen_lr, spec.weight_decay)].append(named[name])
        param_groups = [{"params": ps, "eigen_lr": e, "lr": t.lr * e,
                         "weight_decay": t.weight_decay if wd else 0.0}
                        for (e, wd), ps in groups.items()]
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") for p in named.values())
        super().__init__(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                         weight_decay=0.0, fused=fused or None, foreach=None if fused else True)
        self.train_cfg = t
        self.step_count = 0
        self.last_grad_norm = torch.zeros(())
        self.projection = (UnitNormProjection([(named[n], s.project_axis) for n, s in specs.items()
                                               if s.project_axis is not None])
                           if model_cfg.norm == "ngpt" else None)

    def lr_at(self, step: int) -> float:
        t = self.train_cfg
        return learning_rate(step, t.lr, t.min_lr, t.warmup_steps, t.horizon)

    @torch.no_grad()
    def step(self, closure=None):
        """One full TnT update; returns the closure's loss (if any). The global norm of the
        gradients as they came (before multipliers and clip) is left in `last_grad_norm`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_grad_norm = clip_grad_norm([(g["params"], g["eigen_lr"])
                                              for g in self.param_groups], self.train_cfg.grad_clip)
        base = self.lr_at(self.step_count)
        for group in self.param_groups:
            group["lr"] = base * group["eigen_lr"]
        super().step()
        if self.projection is not None:
            self.projection()
        self.step_count += 1
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["tnt_step_count"] = self.step_count
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.step_count = int(state_dict.pop("tnt_step_count", 0))
        super().load_state_dict(state_dict)

    def canonical_state(self) -> dict[str, np.ndarray]:
        """Adam's moments and step count per canonical name (`<name>.exp_avg`, ...), float32
        numpy copies; zeros before the first step. The moments are those of the stored gradient
        `eigen_lr * g` (see the module docstring)."""
        out = {}
        for p, name in self.name_of.items():
            st = self.state.get(p, {})
            for key in ADAM_KEYS:
                value = st.get(key)
                if value is None:
                    value = torch.zeros(() if key == "step" else p.shape)
                value = full(torch.as_tensor(value)).to(torch.float32)  # FSDP2: gathered
                out[f"{name}.{key}"] = value.detach().cpu().numpy().copy()
        return out

    def load_canonical_state(self, arrays: dict[str, np.ndarray], step_count: int,
                             moment_factors: dict[str, float] | None = None) -> None:
        """Inverse of `canonical_state`; every name must be present with the parameter's shape.
        `moment_factors` (`tnt.checkpoint_meta.adam_moment_factors`, for a version-1 checkpoint)
        multiply a parameter's `exp_avg` by the factor and its `exp_avg_sq` by the square."""
        factors = moment_factors or {}
        check_names(arrays, self.model_cfg, "optimizer state entries",
                    tuple(f".{k}" for k in ADAM_KEYS))
        for p, name in self.name_of.items():
            st = {}
            for key in ADAM_KEYS:
                a = np.asarray(arrays[f"{name}.{key}"], dtype=np.float32)
                if key != "step" and name in factors:
                    a = a * np.float32(factors[name] ** (1 if key == "exp_avg" else 2))
                want = () if key == "step" else tuple(p.shape)
                if a.shape != want:
                    raise ValueError(f"optimizer state {name}.{key} has shape {a.shape}, "
                                     f"expected {want}")
                on_param = key != "step" or self.defaults.get("fused")
                st[key] = (like(torch.tensor(a), p) if key != "step"  # sharded like p
                           else torch.tensor(a, device=p.device if on_param else "cpu"))
            self.state[p] = st
        self.step_count = int(step_count)


def build_optimizer(model: nn.Module, model_cfg: ModelConfig,
                    train_cfg: TrainConfig) -> TnTOptimizer:
    """The full TnT optimizer for a model (see `TnTOptimizer`)."""
    return TnTOptimizer(model, model_cfg, train_cfg)
