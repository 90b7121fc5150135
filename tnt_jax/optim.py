"""optax transforms for nGPT: eigen learning rates and the unit-norm projection, and the builder
that chains them in docs/design.md's order:

    (eigen-LR multipliers -> clip) -> Adam -> weight decay (rmsnorm) -> eigen-LR multipliers
    -> learning rate -> projection

The two multiplications by `m = init/scale` reproduce the nGPT reference's storage of each scaler
at `p / m` (docs/design.md, "The scalers"): its gradient is `m g`, which the clip and Adam see,
and its step is `m` times Adam's. So Adam's moments (`mu`, `nu`) are those of `m g`, the stored
gradient, not of `g`.

The projection is the last transform, so `optax.apply_updates(params, updates)` lands exactly on
the unit sphere; nobody writing their own loop can forget it. Both transforms work on any pytree
whose paths spell the canonical names (the flat dict TnT trains, or an `nnx.State`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tnt.config import ModelConfig, TrainConfig
from tnt.params import check_names, param_specs
from tnt.schedule import learning_rate_table
from tnt_jax.model import l2norm


def path_name(path) -> str:
    """A pytree path as a canonical name: ("decoder", "layers", 0, "attn", "wq") -> dotted."""
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        parts.append(str(part))
    if parts and parts[-1] == "value":  # nnx.Variable leaves
        parts.pop()
    return ".".join(parts)


def scale_by_eigen_lr(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiply each leaf by `multiplier(name)`, its eigen-LR `m = init/scale`.

    Chained before the clip it turns the gradient of an effective scaler into the gradient of
    the reference's stored one (`m g`); chained after Adam it turns the stored step into the
    effective one (`m` times). Together they are the reference's reparametrization, exactly.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u if (m := multiplier(path_name(path))) == 1.0 else u * m, updates)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_stored_gradients(multiplier: Callable[[str], float],
                          max_norm: float) -> optax.GradientTransformation:
    """`scale_by_eigen_lr` then `optax.clip_by_global_norm`: the reference clips its stored
    gradients `m g`. One transform with the clip's (empty) state, so the chain's state is the
    tree every checkpoint version holds (orbax restores only an identical tree)."""
    scale, clip = scale_by_eigen_lr(multiplier), optax.clip_by_global_norm(max_norm)

    def update_fn(updates, state, params=None):
        updates, _ = scale.update(updates, scale.init(None))
        return clip.update(updates, state, params)

    return optax.GradientTransformation(clip.init, update_fn)


def unit_norm_projection(axis: Callable[[str], int | None]) -> optax.GradientTransformation:
    """Return `norm(params + u) - params` for every leaf with a d_model axis (docs/design.md).

    Chain it last: afterwards `params + updates` is unit-norm along that axis. Leaves whose
    `axis(name)` is None (scalers, RMSNorm scales) pass through untouched.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("unit_norm_projection needs params: call tx.update(updates, state, "
                             "params)")

        def project(path, u, p):
            ax = axis(path_name(path))
            return u if ax is None else l2norm(p + u, ax) - p

        return jax.tree_util.tree_map_with_path(project, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def convert_adam_moments(opt_state: optax.OptState, factors: dict[str, float]) -> optax.OptState:
    """Multiply the Adam moments of the named leaves, `mu` by the factor and `nu` by its square
    (`tnt.checkpoint_meta.adam_moment_factors`: restoring a version-1 checkpoint)."""

    def scale(tree, power: int):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x * factors[n] ** power if (n := path_name(path)) in factors else x,
            tree)

    def convert(state):
        if isinstance(state, optax.ScaleByAdamState):
            return state._replace(mu=scale(state.mu, 1), nu=scale(state.nu, 2))
        return state

    return jax.tree.map(convert, opt_state,
                        is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))


def lr_table(model_cfg: ModelConfig, train_cfg: TrainConfig) -> np.ndarray:
    """The shared schedule (tnt.schedule) as one rate per step, float64."""
    t = train_cfg.resolved(model_cfg.norm)
    # Past max(warmup, horizon) the rate is constant (min_lr), so the table's last entry serves.
    length = max(t.horizon, t.warmup_steps, t.max_steps) + 2
    return learning_rate_table(t.lr, t.min_lr, t.warmup_steps, t.horizon, length)


def scale_by_lr_table(default: np.ndarray) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_learning_rate` by table lookup, the table an argument of `update`
    (`lr_table=`, a jax array: an input of the compiled step, so runs differing only in their
    rates share one program) or, without it, `default` (a constant of the program). Same
    state as optax's (`ScaleByScheduleState`), so checkpoints keep their tree."""
    default = jnp.asarray(default)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, lr_table=None, **extra_args):
        del params, extra_args
        table = default if lr_table is None else lr_table
        rate = -table[jnp.minimum(state.count, table.shape[0] - 1)]
        updates = jax.tree.map(lambda g: jnp.array(rate, dtype=g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build_optimizer(model_cfg: ModelConfig,
                    train_cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The full TnT optimizer for a config; updates go to the canonical flat dict. Its `update`
    takes the schedule as `lr_table=` (`lr_table(...)` as a jax array) or uses the config's."""
    t = train_cfg.resolved(model_cfg.norm)
    specs = param_specs(model_cfg)

    def eigen_lr(name: str) -> float:
        return specs[name].eigen_lr

    chain = [clip_stored_gradients(eigen_lr, t.grad_clip),
             optax.scale_by_adam(b1=t.beta1, b2=t.beta2, eps=t.eps)]
    if t.weight_decay:
        chain.append(optax.add_decayed_weights(t.weight_decay, mask=lambda params: (
            jax.tree_util.tree_map_with_path(lambda p, _: specs[path_name(p)].weight_decay,
                                             params))))
    chain += [scale_by_eigen_lr(eigen_lr), scale_by_lr_table(lr_table(model_cfg, train_cfg))]
    if model_cfg.norm == "ngpt":
        chain.append(unit_norm_projection(lambda n: specs[n].project_axis))
    tx = optax.chain(*chain)

    def init_fn(params):
        names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        if names:  # optax.tree_map_params initializes with a leafless placeholder tree
            check_names(names, model_cfg, "optimizer parameters")
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)
