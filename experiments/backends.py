"""Loading a framework backend by name, lazily, so that each entry point imports only one.

`Backend` is the surface the entry points use; `tnt_jax.train.JaxBackend` and
`tnt_torch.train.TorchBackend` implement it (tests/test_pretrain.py checks both).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tnt.config import RunConfig

BACKENDS = ("jax", "torch")


class BackendUnavailable(RuntimeError):
    pass


class Backend(Protocol):
    """One framework's training run: steps, evaluation, checkpoints and a text sample."""

    name: str
    cfg: RunConfig
    rows: slice  # this process's rows of every global batch (all of them in one process)

    def step(self, batch: dict[str, np.ndarray]) -> dict:
        """One optimizer step on a numpy batch; returns the step's metrics (framework arrays)."""

    def evaluate(self, batches) -> float:
        """Mean loss over non-pad labels of `batches`."""

    @property
    def step_count(self) -> int: ...

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """Some parameters as numpy, by canonical name."""

    def nonfinite(self) -> list[str]:
        """Names of the parameters holding a NaN or an infinity (checked on the device)."""

    def model(self):
        """The framework's `TnT` with the current parameters."""

    def open(self, directory, keep: int) -> None: ...

    def save(self, tokenizer_spec: dict) -> None: ...

    def wait(self) -> None:
        """Block until every save has reached the disk."""

    def restore(self, path) -> dict:
        """Load parameters and optimizer state from a checkpoint; returns its metadata."""

    def sample(self, tokenizer, prompt: str, n: int, temperature: float = 0.0,
               seed: int = 0) -> str:
        """`inference` of up to `n` new tokens from `prompt`, greedy or at `temperature`."""


def backend_class(name: str) -> type[Backend]:
    """The backend class for `name` (`JaxBackend`), with a clear error for an unknown name."""
    if name == "jax":
        from tnt_jax.train import JaxBackend

        return JaxBackend
    if name == "torch":
        from tnt_torch.train import TorchBackend

        return TorchBackend
    raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
