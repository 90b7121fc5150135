"""Shared fixtures; helpers for tiny configs live in `helpers.py`.

JAX runs with `jax_numpy_rank_promotion="raise"`: an operation between arrays of different ranks
(a silent broadcast) is an error, so the model states every broadcast it means. fp32 matmuls run
at "highest" precision: on a GPU, XLA's default uses reduced-precision passes (~2e-2 on logits,
see parity_tests/conftest.py), which the fp32 tolerances here (1e-5) do not allow; the CPU
ignores the setting.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

# pytest-xdist runs several test processes (pyproject.toml): on a GPU each takes memory as it needs
# it instead of JAX's default 75% of the device, which would leave the next process none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A folder of small Python files, the training text of the end-to-end runs (one per test
    module, as each module's runs may write next to it)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 30)
    return str(root)
