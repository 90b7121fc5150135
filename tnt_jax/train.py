"""The jitted train and evaluation steps (the training state around them is
`tnt_jax.backend.Trainer`).

The train state is a plain pytree: the canonical flat parameter dict, the optax state and the
step. `train_step` (loss, grads accumulated over `grad_accum` microbatches, clip, Adam, eigen
LRs, schedule, projection) is one compiled function of (state, batch). Where each array lives on
the `(data, fsdp, tensor)` mesh is `tnt_jax.sharding`'s business (default: every device on
`data`, parameters replicated).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tnt.config import ModelConfig, microbatch_rows
from tnt_jax.model import TnT, loss_fn, merge_params, split_params


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: optax.OptState
    step: jax.Array


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state: the model's own initialization seeded by `seed`, `tx`'s state, step 0.

    A pure function of its arguments, so `jax.jit` with output shardings computes every array
    where it lives (each device only its shards; `tnt_jax.backend.Trainer`)."""
    _, params = split_params(TnT(cfg, nnx.Rngs(params=seed)))
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


def model_graph(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure without its arrays (traced abstractly: nothing is allocated)."""
    return nnx.split(nnx.eval_shape(lambda: TnT(cfg, nnx.Rngs(params=0))), nnx.Param)[0]


def microbatches(batch: dict, n: int) -> dict:
    """Split a global batch into `n` microbatches, stacked on a new leading axis: microbatch i is
    rows i, i+n, i+2n, ... (strided, so each microbatch keeps rows from every device of the data
    mesh). The same split as `tnt_torch.train.microbatches`."""
    rows = microbatch_rows(batch["labels"].shape[0], n)

    def split(x):
        return jnp.swapaxes(x.reshape(rows, n, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def microbatch_sum(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed nats over the non-pad labels, their count) of one microbatch: what the
    microbatches of `accumulate_grads` and `token_sum` add up."""
    loss, count = loss_fn(merge_params(graphdef, params), batch)
    return loss * count, count


def accumulate_grads(graphdef: nnx.GraphDef, params: dict, batch: dict, grad_accum: int):
    """(loss, label tokens, grads) of the global batch, from `grad_accum` microbatches: a pure
    function returning the grads (`tnt_torch.train.accumulate_grads`, the same job, leaves them
    in `.grad`, torch's idiom).

    The loss is the mean over the non-pad labels of the WHOLE batch, so each microbatch
    contributes its token sum (its mean times its count), not its mean: the sums and their
    gradients are accumulated in a `lax.scan` (one microbatch's activations live at a time) and
    divided by the global count at the end, which gives the gradient of one big batch.
    """
    if grad_accum == 1:
        (loss, count), grads = jax.value_and_grad(
            lambda p, b: loss_fn(merge_params(graphdef, p), b), has_aux=True)(params, batch)
        return loss, count, grads

    def body(carry, micro):
        total, count, grads = carry
        (s, c), g = jax.value_and_grad(partial(microbatch_sum, graphdef), has_aux=True)(params, micro)
        carry = (total + s.astype(total.dtype), count + c.astype(count.dtype),
                 jax.tree.map(jnp.add, grads, g))
        return carry, None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
    (total, count, grads), _ = jax.lax.scan(body, init, microbatches(batch, grad_accum))
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    return total * scale, count, jax.tree.map(lambda g: g * scale, grads)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum: int = 1,
                    state_sharding: TrainState | None = None):
    """One optimizer step as a pure function, compiled once; the old state's buffers are donated.
    With `state_sharding` the new state is pinned to it (parameters and moments stay sharded).

    With `grad_accum` > 1 the batch is split into microbatches inside the compiled step
    (`accumulate_grads`); clipping, the eigen LRs and the projection (all in `tx`) then see the
    accumulated gradient once per global step.

    `lr_table` (`tnt_jax.optim.lr_table` as a jax array), when given, is passed to `tx.update`:
    the rates are then an input of the program, not constants, and one compile serves every rate.
    """
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")

    @partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None))
    def train_step(state: TrainState, batch: dict[str, jax.Array], lr_table: jax.Array | None = None):
        loss, count, grads = accumulate_grads(graphdef, state.params, batch, grad_accum)
        rates = {} if lr_table is None else {"lr_table": lr_table}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **rates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": count}
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


def token_sum(graphdef: nnx.GraphDef, params: dict, batch: dict, grad_accum: int = 1
              ) -> tuple[jax.Array, jax.Array]:
    """(summed nats over the non-pad labels, their count) of a batch, run as `grad_accum`
    microbatches in a `lax.scan` like the train step: evaluation never holds more activations
    than a training microbatch (the planner sizes that, not the whole batch). The same job as
    `tnt_torch.train.token_sum`; this one is pure and traceable (`make_eval_step` compiles it)."""
    if grad_accum == 1:
        return microbatch_sum(graphdef, params, batch)

    def body(carry, micro):
        s, c = microbatch_sum(graphdef, params, micro)
        return (carry[0] + s.astype(jnp.float32), carry[1] + c.astype(jnp.int32)), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    return jax.lax.scan(body, init, microbatches(batch, grad_accum))[0]


def make_eval_step(graphdef: nnx.GraphDef, grad_accum: int = 1):
    """`token_sum` of (params, batch), compiled once."""
    return jax.jit(partial(token_sum, graphdef, grad_accum=grad_accum))
