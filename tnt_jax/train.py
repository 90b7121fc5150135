"""The jitted train step and the JAX backend of `experiments.pretrain`.

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
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tnt import checkpoint_io
from tnt.checkpoint_meta import adam_moment_factors, make_meta
from tnt.config import RunConfig
from tnt.data import check_token_ids
from tnt_jax import checkpoint, sharding
from tnt_jax.generate import inference
from tnt_jax.model import TnT, loss_fn, merge_params, split_params
from tnt_jax.optim import build_optimizer, convert_adam_moments


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: optax.OptState
    step: jax.Array


def microbatches(batch: dict, n: int) -> dict:
    """Split a global batch into `n` microbatches, stacked on a new leading axis: microbatch i is
    rows i, i+n, i+2n, ... (strided, so each microbatch keeps rows from every device of the data
    mesh). The same split as `tnt_torch.train.microbatches`."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def token_sum(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed nats over the non-pad labels, their count): what microbatches add up."""
    loss, count = loss_fn(merge_params(graphdef, params), batch)
    return loss * count, count


def accumulated_grads(graphdef: nnx.GraphDef, params: dict, batch: dict, grad_accum: int):
    """(loss, label tokens, grads) of the global batch, from `grad_accum` microbatches.

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
        (s, c), g = jax.value_and_grad(partial(token_sum, graphdef), has_aux=True)(params, micro)
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
    (`accumulated_grads`); clipping, the eigen LRs and the projection (all in `tx`) then see the
    accumulated gradient once per global step.
    """
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")

    @partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None))
    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rows = batch["labels"].shape[0]
        if rows % grad_accum:
            raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={grad_accum}")
        loss, count, grads = accumulated_grads(graphdef, state.params, batch, grad_accum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": count}
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, grad_accum: int = 1):
    """(summed nats, label tokens) of a batch, compiled once. Like the train step it runs the
    batch as `grad_accum` microbatches in a `lax.scan`, so evaluation never holds more
    activations than a training microbatch (the planner sizes that, not the whole batch)."""
    @jax.jit
    def eval_step(params, batch):
        if grad_accum == 1:
            return token_sum(graphdef, params, batch)

        def body(carry, micro):
            s, c = token_sum(graphdef, params, micro)
            return (carry[0] + s.astype(jnp.float32), carry[1] + c.astype(jnp.int32)), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(body, init, microbatches(batch, grad_accum))[0]

    return eval_step


@jax.jit
def _finite_flags(params: dict[str, jax.Array]) -> jax.Array:
    """Whether each parameter (in sorted name order) is all finite, reduced on the devices."""
    return jnp.stack([jnp.isfinite(params[n]).all() for n in sorted(params)])


class JaxBackend:
    """What `experiments.pretrain` needs from a framework: init, step, evaluate, save, restore."""

    name = "jax"

    def __init__(self, cfg: RunConfig, mesh: Mesh | None = None) -> None:
        self.cfg = cfg
        self.mesh = mesh or sharding.build_mesh(sharding.MeshShape.parse("", jax.device_count()))
        sharding.check_fits(sharding.mesh_shape(self.mesh), cfg)
        model = TnT(cfg.model, nnx.Rngs(params=cfg.train.seed))
        self.graphdef, params = split_params(model)
        self.tx = build_optimizer(cfg.model, cfg.train)
        self.state_sharding = self._shardings(params)
        params = jax.device_put(params, self.state_sharding.params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        self.state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32),
                                                                  self.state_sharding.step))
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.rows = sharding.local_rows(self.batch_sharding, cfg.train.batch_size)
        self._train_step = make_train_step(self.graphdef, self.tx, cfg.train.grad_accum,
                                           self.state_sharding)
        self._eval_step = make_eval_step(self.graphdef, cfg.train.grad_accum)

    def _shardings(self, params: dict[str, jax.Array]) -> TrainState:
        by_name = sharding.param_shardings(self.mesh, self.cfg.model)
        return TrainState(by_name, sharding.opt_state_shardings(self.mesh, self.tx, params, by_name),
                          NamedSharding(self.mesh, P()))

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch, or this process's `self.rows` of one, as sharded global arrays."""
        rows = len(next(iter(batch.values())))
        if jax.process_count() > 1:  # several hosts: each holds only its rows of the global batch
            if rows == self.cfg.train.batch_size:
                batch = {k: v[self.rows] for k, v in batch.items()}
            rows = self.cfg.train.batch_size
        for key, value in batch.items():
            check_token_ids(value, self.cfg.model.vocab_size, key)
        return sharding.put_batch(batch, self.batch_sharding, rows)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        self.state, metrics = self._train_step(self.state, self._put(batch))
        return metrics

    def evaluate(self, batches) -> float:
        total, count = 0.0, 0
        for batch in batches:
            s, c = self._eval_step(self.state.params, self._put(batch))
            total, count = total + float(s), count + int(c)
        return total / max(count, 1)

    @property
    def step_count(self) -> int:
        return int(self.state.step)

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """Some parameters as numpy (e.g. the alphas for logging)."""
        return {n: sharding.to_numpy(self.state.params[n]) for n in names}

    def nonfinite(self) -> list[str]:
        """Parameters holding a NaN or an infinity (one flag each is read, not the weights)."""
        flags = sharding.to_numpy(_finite_flags(self.state.params))
        return [n for n, ok in zip(sorted(self.state.params), flags, strict=True) if not ok]

    def model(self) -> TnT:
        return merge_params(self.graphdef, self.state.params)

    def open(self, directory, keep: int) -> None:
        self.manager = checkpoint.open_manager(directory, keep)

    def save(self, tokenizer_spec: dict) -> None:
        step = self.step_count
        meta = make_meta(self.name, step, self.cfg, tokenizer_spec)
        checkpoint.save(self.manager, step, self.state._asdict(), meta)

    def wait(self) -> None:
        checkpoint.wait(self.manager)

    def restore(self, path) -> dict:
        step_dir, _ = checkpoint_io.find_checkpoint(path, self.name)
        state, meta = checkpoint.restore(step_dir, self.state._asdict(), self.cfg.model)
        state["opt_state"] = convert_adam_moments(state["opt_state"],
                                                  adam_moment_factors(meta, self.cfg.model))
        self.state = TrainState(**state)
        return meta

    def sample(self, tokenizer, prompt: str, n: int, temperature: float = 0.0,
               seed: int = 0) -> str:
        """`inference` of up to `n` new tokens from `prompt` (the end-of-run sample): greedy, or
        sampled at `temperature` with `seed`."""
        return inference(self.model(), tokenizer, prompt, max_length=n, temperature=temperature,
                         seed=seed)
