"""The jitted train step and the JAX backend of `experiments.pretrain`.

The train state is a plain pytree: the canonical flat parameter dict, the optax state and the
step. `train_step` (loss, grads, clip, Adam, eigen LRs, schedule, projection) is one compiled
function of (state, batch). Where each array lives on the `(data, fsdp, tensor)` mesh is
`tnt_jax.sharding`'s business (default: every device on `data`, parameters replicated).
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

from tnt.checkpoint_meta import make_meta
from tnt.config import RunConfig
from tnt.data import check_token_ids
from tnt_jax import checkpoint, sharding
from tnt_jax.generate import greedy
from tnt_jax.model import TnT, loss_fn, merge_params, split_params
from tnt_jax.optim import build_optimizer


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: optax.OptState
    step: jax.Array


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    state_sharding: TrainState | None = None):
    """One optimizer step as a pure function, compiled once; the old state's buffers are donated.
    With `state_sharding` the new state is pinned to it (parameters and moments stay sharded)."""

    @partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, None))
    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_of(params):
            return loss_fn(merge_params(graphdef, params), batch)

        (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": count}
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    @jax.jit
    def eval_step(params, batch):
        loss, count = loss_fn(merge_params(graphdef, params), batch)
        return loss * count, count

    return eval_step


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
        self._train_step = make_train_step(self.graphdef, self.tx, self.state_sharding)
        self._eval_step = make_eval_step(self.graphdef)

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

    def model(self) -> TnT:
        return merge_params(self.graphdef, self.state.params)

    def open(self, directory, keep: int) -> None:
        self.manager = checkpoint.open_manager(directory, keep)

    def save(self, tokenizer_spec: dict) -> None:
        step = self.step_count
        meta = make_meta(self.name, step, self.cfg, tokenizer_spec)
        checkpoint.save(self.manager, step, self.state._asdict(), meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    @staticmethod
    def read_meta(path) -> dict:
        return checkpoint.read_meta(path)[2]

    def restore(self, path) -> dict:
        state, meta = checkpoint.restore(path, self.state._asdict(), self.cfg.model)
        self.state = TrainState(**state)
        return meta

    def sample(self, enc_tokens: np.ndarray | None, prefix: np.ndarray, n: int) -> np.ndarray:
        return greedy(self.model(), enc_tokens, prefix, n)
