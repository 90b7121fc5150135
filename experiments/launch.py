"""This process's role in a run: alone, one of several JAX hosts, or one torchrun rank.

`experiments.pretrain` asks `start(args)` once. For JAX it joins a multi-host job when a
coordinator is given (`--coordinator`/`--num-processes`/`--process-id`, or the environment
variables `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`) and builds the
`--mesh`; for torch, torchrun's `WORLD_SIZE`/`RANK` make the backend join its process group.
Only the main process (index 0) writes the run folder's config, TensorBoard, prints and the
progress bar; every process runs the same steps (their collectives must match).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from tnt.config import ConfigError, RunConfig


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="jax device mesh, e.g. data=2,fsdp=4,tensor=1 (axes left out "
                                  "are 1; data takes the remaining devices; default: all on data)")
    p.add_argument("--coordinator", help="jax multi-host: address:port of process 0 "
                                         "(or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="jax multi-host: number of processes "
                                                     "(or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="jax multi-host: this process's index "
                                                  "(or JAX_PROCESS_ID)")


@dataclass
class Role:
    index: int = 0
    count: int = 1
    backend_kwargs: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.index == 0

    def check(self, cfg: RunConfig) -> None:
        """Refuse, before anything is written, a mesh or a set of torch ranks the model or batch
        cannot split over, and fsdp=true where it does not apply (JAX, or torch in one process)."""
        mesh = self.backend_kwargs.get("mesh")
        if cfg.train.fsdp and mesh is not None:
            raise ConfigError("fsdp=true is torch's FSDP2; with --backend jax shard with "
                              "--mesh fsdp=F (see README)")
        if cfg.train.fsdp and self.count == 1:
            from tnt_torch.distributed import FSDP_NEEDS_RANKS

            raise ConfigError(FSDP_NEEDS_RANKS)
        if mesh is not None:
            from tnt_jax.sharding import check_fits, mesh_shape

            check_fits(mesh_shape(mesh), cfg)
        elif self.count > 1:  # torchrun ranks
            cfg.train.check_rows_split(self.count, f"{self.count} ranks")


class NullWriter:
    """The TensorBoard writer of a process that is not the main one: writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def start(args: argparse.Namespace) -> Role:
    if args.backend == "jax":
        role = _start_jax(args)
    else:
        if args.mesh or args.coordinator:
            raise ConfigError("--mesh and --coordinator are for --backend jax; launch torch "
                              "with torchrun --nproc-per-node N (see README)")
        role = Role(_env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1)
    if not role.main:  # prints and tqdm.write of the other processes would repeat rank 0's
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return role


def _start_jax(args: argparse.Namespace) -> Role:
    import jax

    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator or count is not None or index is not None:
        missing = [n for n, v in (("--coordinator", coordinator), ("--num-processes", count),
                                  ("--process-id", index)) if v is None]
        if missing:
            raise ConfigError(f"a multi-host jax run needs {', '.join(missing)} too (or the "
                              f"JAX_* environment variables)")
        if not 0 <= index < count:
            raise ConfigError(f"--process-id={index} is outside [0, --num-processes={count})")
        jax.distributed.initialize(coordinator, count, index)
    from tnt_jax.sharding import MeshShape, build_mesh

    mesh = build_mesh(MeshShape.parse(args.mesh, jax.device_count()))
    return Role(jax.process_index(), jax.process_count(), {"mesh": mesh})
