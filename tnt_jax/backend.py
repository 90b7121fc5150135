"""The JAX adapter (`tnt.backend.Backend`): the training state, checkpoints with their metadata,
scoring, decoding, devices and multi-host start, over `tnt_jax.train`, `checkpoint`, `generate`
and `sharding`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tnt import checkpoint_io
from tnt.backend import Launch, Role, env_int
from tnt.checkpoint_meta import adam_moment_factors, make_meta
from tnt.config import ConfigError, ModelConfig, RunConfig
from tnt.data import check_token_ids
from tnt.generation import Generation, Sampling
from tnt_jax import checkpoint, sharding
from tnt_jax.checkpoint import load  # noqa: F401 (the adapter's `load`)
from tnt_jax.generate import generate as _generate
from tnt_jax.generate import inference
from tnt_jax.model import TnT, merge_params, split_params
from tnt_jax.optim import build_optimizer, convert_adam_moments, lr_table
from tnt_jax.score import label_logprobs
from tnt_jax.train import TrainState, init_state, make_eval_step, make_train_step, model_graph

name = "jax"


@jax.jit
def _finite_flags(params: dict[str, jax.Array]) -> jax.Array:
    """Whether each parameter (in sorted name order) is all finite, reduced on the devices."""
    return jnp.stack([jnp.isfinite(params[n]).all() for n in sorted(params)])


class Trainer:
    """The training state of a JAX run (`tnt.backend.Trainer`): parameters, optax state and step
    on the `mesh`, the compiled train and evaluation steps, an orbax checkpoint manager."""

    name = name

    def __init__(self, cfg: RunConfig, mesh: Mesh | None = None) -> None:
        if cfg.train.compile is False:  # true and none (auto) describe the jitted step
            raise ConfigError("compile=false applies to --backend torch: the JAX train step is "
                              "always compiled by XLA (jax.jit)")
        self.cfg = cfg
        self.mesh = mesh or sharding.build_mesh(sharding.MeshShape.parse("", jax.device_count()))
        sharding.check_fits(sharding.mesh_shape(self.mesh), cfg)
        self.graphdef = model_graph(cfg.model)
        self.tx = build_optimizer(cfg.model, cfg.train)
        # Built on the mesh: the model's init and tx.init run as one jitted program whose outputs
        # are sharded by the rules, so no device (or host) ever holds the whole state.
        init = partial(init_state, cfg.model, self.tx, cfg.train.seed)
        self.state_sharding = self._shardings(jax.eval_shape(init).params)
        self.state = jax.jit(init, out_shardings=self.state_sharding)()
        # an input of the step, not a constant in it: runs differing only in lr share one program
        self.lr_table = jax.device_put(jnp.asarray(lr_table(cfg.model, cfg.train)),
                                       NamedSharding(self.mesh, P()))
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.rows = sharding.local_rows(self.batch_sharding, cfg.train.batch_size)
        self._train_step = make_train_step(self.graphdef, self.tx, cfg.train.grad_accum,
                                           self.state_sharding)
        self._eval_step = make_eval_step(self.graphdef, cfg.train.grad_accum)

    def _shardings(self, params: dict[str, jax.ShapeDtypeStruct]) -> TrainState:
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
        self.state, metrics = self._train_step(self.state, self._put(batch), self.lr_table)
        return metrics

    def evaluate(self, batches: Iterable[dict[str, np.ndarray]]) -> float:
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

    def open(self, directory: str | Path, keep: int) -> None:
        self.manager = checkpoint.open_manager(directory, keep)

    def save(self, tokenizer_spec: dict) -> None:
        step = self.step_count
        meta = make_meta(self.name, step, self.cfg, tokenizer_spec)
        checkpoint.save(self.manager, step, self.state._asdict(), meta)

    def wait(self) -> None:
        checkpoint.wait(self.manager)

    def restore(self, path: str | Path) -> dict:
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


def start(launch: Launch) -> Role:
    """Join a multi-host job when a coordinator is given (the flags, or `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), then build the device mesh of `launch.mesh`."""
    coordinator = launch.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = launch.num_processes if launch.num_processes is not None else env_int("JAX_NUM_PROCESSES")
    index = launch.process_id if launch.process_id is not None else env_int("JAX_PROCESS_ID")
    if coordinator or count is not None or index is not None:
        missing = [n for n, v in (("--coordinator", coordinator), ("--num-processes", count),
                                  ("--process-id", index)) if v is None]
        if missing:
            raise ConfigError(f"a multi-host jax run needs {', '.join(missing)} too (or the "
                              f"JAX_* environment variables)")
        if not 0 <= index < count:
            raise ConfigError(f"--process-id={index} is outside [0, --num-processes={count})")
        jax.distributed.initialize(coordinator, count, index)
    mesh = sharding.build_mesh(sharding.MeshShape.parse(launch.mesh, jax.device_count()))
    return Role(jax.process_index(), jax.process_count(), {"mesh": mesh})


def check(role: Role, cfg: RunConfig) -> None:
    """fsdp=true is torch's; the mesh must split the model and the batch."""
    if cfg.train.fsdp:
        raise ConfigError("fsdp=true is torch's FSDP2; with --backend jax shard with "
                          "--mesh fsdp=F (docs/scale.md)")
    if "mesh" in role.options:
        sharding.check_fits(sharding.mesh_shape(role.options["mesh"]), cfg)


def trainer(cfg: RunConfig, role: Role | None = None) -> Trainer:
    return Trainer(cfg, **(role.options if role else {}))


def init_model(cfg: ModelConfig, seed: int = 0) -> TnT:
    return TnT(cfg, nnx.Rngs(seed))


def _checked(model: TnT, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    for key, value in batch.items():  # a gather would clamp an out-of-range id silently
        check_token_ids(value, model.cfg.vocab_size, key)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def token_sums(model: TnT, cfg: RunConfig) -> Callable[[dict], tuple[float, int]]:
    graphdef, params = split_params(model)
    step = make_eval_step(graphdef, cfg.train.grad_accum)

    def score(batch: dict[str, np.ndarray]) -> tuple[float, int]:
        s, c = step(params, _checked(model, batch))
        return float(s), int(c)

    return score


def token_logprobs(model: TnT, batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(label_logprobs(model, batch)[0], np.float32)


def generate(model: TnT, prompts: list[np.ndarray], max_new_tokens: int, sampling: Sampling, *,
             use_cache: bool = True, warn: bool = True, stop_at_eos: bool = True) -> Generation:
    return _generate(model, prompts, max_new_tokens, sampling, use_cache=use_cache, warn=warn,
                     stop_at_eos=stop_at_eos)


def decode_threads(n: int) -> None:
    """XLA sizes its own thread pool."""
    return None


def devices() -> dict:
    found = jax.devices()
    return {"framework": "jax", "version": jax.__version__, "backend": jax.default_backend(),
            "devices": [f"{d.platform}:{d.device_kind}" for d in found],
            "accelerator": any(d.platform != "cpu" for d in found)}


def device_name() -> str:
    return jax.devices()[0].device_kind


def accelerator() -> bool:
    return jax.default_backend() != "cpu"


def matmul_seconds(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_memory_bytes() -> int | None:
    if not accelerator():
        return None
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None
