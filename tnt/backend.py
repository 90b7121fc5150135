"""The adapter between TnT's framework-free code and one framework, chosen by name.

`backend("jax")` imports `tnt_jax.backend` (or `tnt_torch.backend`) only when asked, so `tnt`
and the command-line tools import no framework. Each of those modules implements `Backend`:
build or load a model with its metadata, the training state (`Trainer`), scoring, decoding,
devices, the matmul peak, and joining a multi-process job.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tnt.config import ConfigError, ModelConfig, RunConfig
from tnt.generation import Generation, Sampling

BACKENDS = ("jax", "torch")
# The top-level packages each backend imports; a missing one means the extra is not installed.
REQUIRES = {"jax": ("jax", "jaxlib", "flax", "optax", "orbax"), "torch": ("torch", "safetensors")}

Batch = dict[str, np.ndarray]


class BackendUnavailable(RuntimeError):
    """An unknown backend name, or a framework that is not installed (the message says which
    extra to install)."""


@dataclass(frozen=True)
class Launch:
    """How this process was asked to join a job (jax: `--mesh`, `--coordinator`, ...; torch:
    torchrun's environment). All unset: one process on its own."""

    mesh: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class Role:
    """This process's place in a run; only the main one (index 0) writes the run folder.
    `options` are keyword arguments for the backend's `Trainer` (e.g. the JAX mesh)."""

    index: int = 0
    count: int = 1
    options: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class Loaded:
    """A model read from a checkpoint with what was saved beside it."""

    model: Any
    cfg: RunConfig
    tokenizer: Any  # None for imported weights that carry no tokenizer
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


class Trainer(Protocol):
    """One framework's training state: steps, evaluation, checkpoints and a text sample."""

    name: str
    cfg: RunConfig
    rows: slice  # this process's rows of every global batch (all of them in one process)

    def step(self, batch: Batch) -> dict:
        """One optimizer step on a numpy batch; returns the step's metrics (framework arrays)."""

    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean loss over non-pad labels of `batches`."""

    @property
    def step_count(self) -> int: ...

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """Some parameters as numpy, by canonical name."""

    def nonfinite(self) -> list[str]:
        """Names of the parameters holding a NaN or an infinity (checked on the device)."""

    def model(self) -> Any:
        """The framework's `TnT` with the current parameters."""

    def open(self, directory: str | Path, keep: int) -> None: ...

    def save(self, tokenizer_spec: dict) -> None: ...

    def wait(self) -> None:
        """Block until every save has reached the disk."""

    def restore(self, path: str | Path) -> dict:
        """Load parameters and optimizer state from a checkpoint; returns its metadata."""

    def sample(self, tokenizer, prompt: str, n: int, temperature: float = 0.0,
               seed: int = 0) -> str:
        """`inference` of up to `n` new tokens from `prompt`, greedy or at `temperature`."""


class Backend(Protocol):
    """What a framework module (`tnt_jax.backend`, `tnt_torch.backend`) provides."""

    name: str

    def start(self, launch: Launch) -> Role:
        """Join the multi-process job `launch` describes (if any); this process's role."""

    def check(self, role: Role, cfg: RunConfig) -> None:
        """Refuse, before anything is written, a launch the config cannot run on (ConfigError)."""

    def trainer(self, cfg: RunConfig, role: Role | None = None) -> Trainer:
        """A fresh training state for `cfg` (initialized from `cfg.train.seed`)."""

    def init_model(self, cfg: ModelConfig, seed: int = 0) -> Any:
        """A randomly initialized model, ready for evaluation and decoding."""

    def load(self, path: str | Path, expect: ModelConfig | None = None) -> Loaded:
        """The newest readable checkpoint under `path` (either backend's layout) as a model."""

    def token_sums(self, model: Any, cfg: RunConfig) -> Callable[[Batch], tuple[float, int]]:
        """A scorer: batch -> (summed nats over its non-pad labels, their count), run in the
        training microbatches (`cfg.train.grad_accum`)."""

    def token_logprobs(self, model: Any, batch: Batch) -> np.ndarray:
        """float32 [B, L] log-probability of each label (0 where the label is padding)."""

    def label_logprobs(self, model: Any, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """`token_logprobs` and, per label, whether it is the argmax over the non-pad tokens
        (the harness's is_greedy, tnt/harness.py)."""

    def generate(self, model: Any, prompts: list[np.ndarray], max_new_tokens: int,
                 sampling: Sampling, *, use_cache: bool = True, warn: bool = True,
                 stop_at_eos: bool = True) -> Generation:
        """Decode a batch of token-id prompts (`tnt.generation` holds the policy)."""

    def decode_threads(self, n: int) -> int | None:
        """Intra-op threads for decoding on the CPU (`n`=0: the framework's default); the
        number in use, or None where the framework has no such setting."""

    def devices(self) -> dict:
        """Version and devices, for `experiments.doctor`."""

    def device_name(self) -> str:
        """The default device's kind (`cpu`, `NVIDIA H100 80GB HBM3`, ...)."""

    def accelerator(self) -> bool:
        """Whether the default device is an accelerator."""

    def matmul_seconds(self, n: int, repeats: int) -> float:
        """Best seconds of `repeats` n x n fp32 matmuls on the default device."""

    def peak_memory_bytes(self) -> int | None:
        """Peak accelerator memory in bytes, or None on the CPU."""


def backend(name: str) -> Backend:
    """The backend module of `name`, imported now; BackendUnavailable for an unknown name or a
    framework that is not installed."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"tnt_{name}.backend")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in REQUIRES[name]:
            raise
        raise BackendUnavailable(f"the {name} backend needs {e.name}, which is not installed: "
                                 f"pip install -e \".[{name}]\"") from e


def env_int(name: str) -> int | None:
    """An integer environment variable (a launcher's rank or process count), None if unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None
