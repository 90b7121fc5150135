"""Where every array of a JAX run lives on a `(data, fsdp, tensor)` device mesh (docs/design.md,
"Sharding").

Every parameter names the logical axis of each of its array axes (`tnt.params.ParamSpec.axes`);
one table, `LOGICAL_RULES`, maps logical axes to mesh axes, so changing the parallelism edits the
table, never the model:

- `embed` (d_model of every matrix) -> `fsdp`: the axis the nGPT projection normalizes, so the
  unit-norm reduction really crosses shards (GSPMD inserts the all-reduce);
- `heads` and `mlp` -> `tensor`, Megatron-style: the output axis of wq/wk/wv and the input axis
  of wo, the MLP hidden axis of w_in and w_out, and s_qk and s_uv along them;
- `vocab` (embed rows, lm_head columns, s_z) is not sharded, nor is `stream`, the d_model axis of
  the vectors that scale the residual stream (alpha, RMSNorm scales): the stream's d_model axis is
  not sharded in the activations (rows are), and a d-sharded scaler there makes XLA re-gather the
  activations ("involuntary full rematerialization") to save a few hundred floats.

Both Adam moments take their parameter's sharding (`optax.tree_map_params` walks the optimizer
state by the params' tree structure), and batches shard their rows over `(data, fsdp)`. The state
is created with these shardings: `tnt_jax.train.init_state` runs under `jax.jit` with them as
output shardings, so each device computes only its shards. The compiled step computes the same
function on any mesh; only the float summation order changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tnt.config import ConfigError, ModelConfig, RunConfig
from tnt.params import ParamSpec, param_specs

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis (tnt.params.AXES) -> the mesh axis it is split over (None: replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": None, "stream": None,
}


@dataclass(frozen=True)
class MeshShape:
    """Devices along each mesh axis; their product is the number of devices used."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mesh axis {axis} must be a positive integer, got {value!r}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)

    @classmethod
    def parse(cls, text: str | None, n_devices: int) -> MeshShape:
        """`"data=2,fsdp=4"` -> MeshShape. An axis left out is 1, except `data`, which takes the
        devices the others leave (so the default, "", puts every device on `data`)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in (text or "").split(","))):
            axis, sep, value = item.partition("=")
            axis = axis.strip()
            if not sep:
                raise ConfigError(f"mesh entry {item!r} is not AXIS=SIZE (axes: {', '.join(AXES)})")
            if axis not in AXES:
                raise ConfigError(f"unknown mesh axis {axis!r}; the axes are {', '.join(AXES)}")
            if axis in sizes:
                raise ConfigError(f"mesh axis {axis} is given twice")
            try:
                sizes[axis] = int(value)
            except ValueError:
                raise ConfigError(f"mesh axis {axis} needs an integer size, got {value!r}") from None
        if "data" not in sizes:
            rest = sizes.get("fsdp", 1) * sizes.get("tensor", 1)
            if rest < 1 or n_devices % rest:
                raise ConfigError(f"mesh fsdp x tensor = {rest} does not divide the {n_devices} "
                                  f"devices, so axis data cannot be filled")
            sizes["data"] = n_devices // rest
        shape = cls(**sizes)
        if shape.size != n_devices:
            raise ConfigError(f"mesh {shape} uses {shape.size} devices but {n_devices} are "
                              f"available; the axis sizes must multiply to {n_devices}")
        return shape


def check_fits(shape: MeshShape, cfg: RunConfig) -> None:
    """Refuse a mesh the model or the batch cannot be split over, naming the axis."""
    m, t = cfg.model, cfg.train
    if m.n_heads % shape.tensor:
        raise ConfigError(f"mesh axis tensor={shape.tensor} does not divide n_heads={m.n_heads}")
    if m.hidden % shape.tensor:
        raise ConfigError(f"mesh axis tensor={shape.tensor} does not divide the MLP width "
                          f"hidden={m.hidden}")
    if m.d_model % shape.fsdp:
        raise ConfigError(f"mesh axis fsdp={shape.fsdp} does not divide d_model={m.d_model}")
    t.check_rows_split(shape.data * shape.fsdp,
                       f"the mesh axes data x fsdp = {shape.data} x {shape.fsdp}")


def build_mesh(shape: MeshShape, devices=None) -> Mesh:
    """A 3-axis mesh with automatic (GSPMD) axis types over `devices` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != shape.size:
        raise ConfigError(f"mesh {shape} needs {shape.size} devices, got {len(devices)}")
    grid = np.array(devices, dtype=object).reshape(shape.data, shape.fsdp, shape.tensor)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(mesh: Mesh) -> MeshShape:
    if tuple(mesh.axis_names) != AXES:
        raise ConfigError(f"a TnT mesh has the axes {AXES}, got {tuple(mesh.axis_names)} "
                          f"(build it with tnt_jax.sharding.build_mesh)")
    return MeshShape(**{a: int(mesh.shape[a]) for a in AXES})


def partition_spec(spec: ParamSpec, rules: dict[str, str | None] = LOGICAL_RULES) -> P:
    """The PartitionSpec of a parameter: `rules` applied to each of its logical axes."""
    missing = [a for a in spec.axes if a not in rules]
    if missing:
        raise KeyError(f"no sharding rule for logical axis {missing[0]!r} of parameter "
                       f"{spec.name} (tnt_jax/sharding.py LOGICAL_RULES)")
    return P(*(rules[a] for a in spec.axes))


def param_shardings(mesh: Mesh, cfg: ModelConfig) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, partition_spec(spec)) for name, spec in param_specs(cfg).items()}


def opt_state_shardings(mesh: Mesh, tx: optax.GradientTransformation, params: dict,
                        shardings: dict[str, NamedSharding]):
    """Shardings for `tx.init(params)`: every params-shaped subtree (Adam's mu and nu) takes the
    params' shardings; counters and other leaves are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over `(data, fsdp)`; sequence and later axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def local_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a global batch this process's devices hold (all of them on one host).

    Each host loads only these (`tnt.data.Batches.train_batch(step, rows)`); the global array is
    assembled by `jax.make_array_from_process_local_data`.
    """
    spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
             for s in sharding.addressable_devices_indices_map((batch_size,)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise ConfigError(f"this process's devices hold non-contiguous rows of the batch on the "
                          f"mesh {sharding.mesh.shape}; order the devices by process")
    return slice(lo, hi)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int):
    """Place a batch (global, or this process's `local_rows` share) as global sharded arrays."""
    out = {}
    for key, value in batch.items():
        global_shape = (batch_size, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), global_shape)
    return out


def to_numpy(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-host) array on this process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a pytree of arrays (for tests and memory reports)."""
    total: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return total
